"""Regenerate `blocks.npz`: llama.cpp's reference quantizers run on a few deterministic rows.

    python tests/gguf_fixtures/generate.py LLAMA_CPP_DIR [--measure N]

LLAMA_CPP_DIR is a llama.cpp source tree, e.g. the one in llama-cpp-python's sdist
(`pip download --no-deps --no-binary :all: llama-cpp-python`, then `vendor/llama.cpp`). The script compiles
`quantize_ref.c` with `ggml/src/ggml-quants.c` (cc, -O2, no floating-point contraction), feeds it the rows
and stores the rows and the blocks it writes. `--measure N` also quantizes N random bf16 super-blocks
with both the reference and hubmerge and prints the share of identical blocks per type.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TYPES = ("q8_0", "q5_0", "q5_1", "q4_K", "q5_K", "q6_K")
WIDTH = 512  # two K-quant super-blocks a row


def rows() -> np.ndarray:
    """Rows that exercise the quantizers' branches: weights of trained-model scale rounded to bf16 (as the
    merged tensors are), heavy tails, an outlier, all-zero and constant rows, tiny values, all-positive."""
    rng = np.random.default_rng(20241206)
    out = [
        rng.standard_normal(WIDTH) * 0.02,
        rng.standard_normal(WIDTH) * 0.02,
        rng.standard_normal(WIDTH) * 1.5,
        rng.standard_t(3, WIDTH) * 0.01,
        np.where(np.arange(WIDTH) == 77, 0.9, rng.standard_normal(WIDTH) * 0.01),
        np.zeros(WIDTH),
        np.full(WIDTH, 0.0123),
        rng.standard_normal(WIDTH) * 1e-9,
        np.abs(rng.standard_normal(WIDTH)) * 0.05 + 0.5,
        -np.abs(rng.standard_normal(WIDTH)) * 0.05,
        np.concatenate([np.zeros(WIDTH // 2), rng.standard_normal(WIDTH // 2) * 0.02]),
        rng.uniform(-1, 1, WIDTH),
    ]
    values = np.stack(out).astype(np.float32)
    as_bf16 = (values.view(np.uint32) + 0x7FFF + ((values.view(np.uint32) >> 16) & 1)) & 0xFFFF0000
    values[:4] = as_bf16[:4].view(np.float32)  # the first rows hold bf16 values exactly
    return values


def compile_reference(llama_cpp: Path, out: Path) -> Path:
    ggml = llama_cpp / "ggml"
    binary = out / "quantize_ref"
    subprocess.run(
        ["cc", "-O2", "-ffp-contract=off", "-std=c11", "-ffunction-sections", "-fdata-sections",
         "-Wl,--gc-sections", f"-I{ggml / 'include'}", f"-I{ggml / 'src'}", str(HERE / "quantize_ref.c"),
         str(ggml / "src" / "ggml-quants.c"), "-o", str(binary), "-lm"],
        check=True,
    )  # fmt: skip
    return binary


def reference(binary: Path, qtype: str, values: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    done = subprocess.run(
        [str(binary), qtype, str(flat.size)], input=flat.tobytes(), capture_output=True, check=True
    )
    return np.frombuffer(done.stdout, dtype=np.uint8).reshape(values.shape[0], -1)


def measure(binary: Path, count: int) -> None:
    import torch

    sys.path.insert(0, str(HERE.parents[1]))
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from hubmerge.gguf.quants import quantize

    values = (torch.randn(count, 256, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16().float()
    for name in TYPES:
        qtype = GGMLQuantizationType[name.upper()]
        ours = quantize(values, qtype).numpy()
        theirs = reference(binary, name, values.numpy())
        size = GGML_QUANT_SIZES[qtype][1]
        same = (ours.reshape(-1, size) == theirs.reshape(-1, size)).all(axis=1)
        print(f"{name}: {same.sum()} of {same.size} blocks identical ({same.mean():.4%})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("llama_cpp", type=Path, help="a llama.cpp source tree (has ggml/src/ggml-quants.c)")
    parser.add_argument("--measure", type=int, default=0, metavar="N", help="compare N random super-blocks")
    args = parser.parse_args()
    values = rows()
    with tempfile.TemporaryDirectory() as tmp:
        binary = compile_reference(args.llama_cpp, Path(tmp))
        blocks = {name: reference(binary, name, values) for name in TYPES}
        np.savez_compressed(HERE / "blocks.npz", rows=values, **blocks)
        if args.measure:
            measure(binary, args.measure)


if __name__ == "__main__":
    main()
