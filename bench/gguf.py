"""GGUF export benchmark: `hubmerge gguf` next to llama.cpp's convert_hf_to_gguf.py + llama_model_quantize.

    python bench/gguf.py [--model FOLDER | --shape 0.1b|0.5b|1.5b] [--types q8_0,q4_k_m] [--llama]

Without `--model`, makes the base checkpoint of that shape with bench/make_checkpoints.py (bench/work/models).
Each step runs in its own process at nice 10, measured by its wall time (under whatever load the machine
has), its CPU seconds (user + system, all threads) and its peak resident memory:

* hubmerge: `python -m hubmerge gguf MODEL --type T -o FILE`, straight from the safetensors folder;
* with `--llama` (needs bench/build_llama.sh): llama.cpp's `convert_hf_to_gguf.py --outtype bf16` once (the
  merge's own precision: no rounding), then `llama_model_quantize` from that BF16 file to each type, as
  llama.cpp's README does it. Its cost for a type is the conversion plus that quantization.

Then both files of each type are compared tensor by tensor: the tensor type llama-quantize chose against
hubmerge's, and the share of identical quantization blocks (bytes) where the types agree. Results are printed
as JSON lines and written to WORK/results.json; the files stay in WORK for inspection.

llama.cpp's converter names the pre-tokenizer by hashing the ids its tokenizer gives a fixed text; the
synthetic checkpoints' small tokenizer (Qwen2's pre-tokenizer, a small vocabulary) has a hash it does not know,
so the harness tells it `qwen2`, which is what hubmerge writes. That changes no tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[0] = str(REPO)  # `import gguf` is the package, not this file
LLAMA_VENV = HERE / "work" / "llama-venv"

# Runs argv[1:] and prints its wall time, CPU seconds and peak RSS (the child's, from getrusage).
_MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss": usage.ru_maxrss * 1024}))
"""

_CONVERT = """
import sys
from pathlib import Path
root = Path(sys.argv[1])
sys.path[:0] = [str(root), str(root / "gguf-py")]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"  # see bench/gguf.py's docstring
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert_hf_to_gguf.main()
"""

_QUANTIZE = """
import ctypes, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3].upper())
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
sys.exit(rc)
"""


def measure(argv: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    done = subprocess.run(
        ["nice", "-n", "10", sys.executable, "-c", _MEASURE, *argv],
        check=True, capture_output=True, text=True, env={**os.environ, **(env or {})},
    )  # fmt: skip
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


def llama_source(python: Path | None) -> Path:
    """The sdist's llama.cpp; with `python`, check that it imports llama_cpp (the build)."""
    found = sorted((HERE / "work" / "llama-src").glob("llama_cpp_python-*/vendor/llama.cpp"))
    built = (
        python is not None
        and python.is_file()
        and subprocess.run([python, "-c", "import llama_cpp"]).returncode == 0
    )
    if not found or (python is not None and not built):
        raise SystemExit(
            "run bench/build_llama.sh first (builds llama-cpp-python into bench/work/llama-venv)"
        )
    return found[-1]


def compare(ours: Path, theirs: Path) -> dict[str, Any]:
    """Tensor types that differ, and the share of identical blocks over the tensors of the same type."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGUFReader

    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    type_differs = {
        n: [a[n].tensor_type.name, b[n].tensor_type.name]
        for n in sorted(a.keys() & b.keys())
        if a[n].tensor_type != b[n].tensor_type
    }
    blocks = same = 0
    by_type: dict[str, list[int]] = {}
    for name in sorted(a.keys() & b.keys()):
        if name in type_differs:
            continue
        qtype = a[name].tensor_type
        size = GGML_QUANT_SIZES[qtype][1]
        x = np.frombuffer(a[name].data.tobytes(), np.uint8).reshape(-1, size)
        y = np.frombuffer(b[name].data.tobytes(), np.uint8).reshape(-1, size)
        n = len(x)
        equal = int((x == y).all(axis=1).sum())
        blocks += n
        same += equal
        counts = by_type.setdefault(qtype.name, [0, 0])
        counts[0] += n
        counts[1] += equal
    return {
        "tensors": len(a),
        "missing": sorted(a.keys() ^ b.keys()),
        "type_differs": type_differs,
        "identical_blocks": same / blocks if blocks else None,
        "by_type": {t: {"blocks": n, "identical": e / n} for t, (n, e) in by_type.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", type=Path, help="a Qwen2 safetensors folder (default: a made-up one of --shape)"
    )
    p.add_argument("--shape", default="1.5b", choices=("0.1b", "0.5b", "1.5b"))
    p.add_argument("--types", default="q8_0,q4_k_m")
    p.add_argument("--llama", action="store_true", help="also run llama.cpp's converter and quantizer")
    p.add_argument(
        "--llama-python",
        type=Path,
        default=LLAMA_VENV / "bin" / "python",
        help="a Python that imports llama_cpp (default: bench/build_llama.sh's venv)",
    )
    p.add_argument("--no-hubmerge", action="store_true", help="reuse WORK's hubmerge files and results")
    p.add_argument(
        "--convert-only",
        action="store_true",
        help="only run convert_hf_to_gguf.py (needs the sdist, not the build)",
    )
    p.add_argument("--work", type=Path, default=HERE / "work" / "gguf-bench")
    args = p.parse_args(argv)
    model = args.model
    if model is None:
        models = HERE / "work" / "models" / args.shape
        model = models / "base"
        if not (model / "model.safetensors").is_file():
            subprocess.run(
                [sys.executable, str(HERE / "make_checkpoints.py"), "--shape", args.shape, "--out", str(models),
                 "--only", "base"],
                check=True,
            )  # fmt: skip
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "results.json"
    results: list[dict[str, Any]] = []
    if args.no_hubmerge:
        results = [r for r in json.loads(saved.read_text()) if r.get("tool") == "hubmerge"]

    def record(row: dict[str, Any]) -> None:
        results.append(row)
        print(json.dumps(row), flush=True)

    hubmerge_env = {"PYTHONPATH": str(REPO)}
    for gguf_type in [] if args.no_hubmerge or args.convert_only else args.types.split(","):
        path = work / f"hubmerge-{gguf_type.upper()}.gguf"
        path.unlink(missing_ok=True)
        cost = measure([sys.executable, "-m", "hubmerge", "gguf", str(model), "--type", gguf_type,
                        "-o", str(path)], hubmerge_env)  # fmt: skip
        record({"tool": "hubmerge", "type": gguf_type, **cost, "file_bytes": path.stat().st_size})

    if args.llama or args.convert_only:
        source = llama_source(None if args.convert_only else args.llama_python)
        bf16 = work / "llama-BF16.gguf"
        converted = work / "convert.json"
        if bf16.is_file() and converted.is_file():  # a --convert-only run made it (beside the build)
            convert = json.loads(converted.read_text())
        else:
            bf16.unlink(missing_ok=True)
            convert = measure([sys.executable, "-c", _CONVERT, str(source), str(model), "--outtype", "bf16",
                               "--outfile", str(bf16)])  # fmt: skip
            converted.write_text(json.dumps(convert) + "\n")
        record(
            {"tool": "convert_hf_to_gguf.py", "type": "bf16", **convert, "file_bytes": bf16.stat().st_size}
        )
        if args.convert_only:
            return 0
        python = str(args.llama_python)
        for gguf_type in args.types.split(","):
            path = work / f"llama-{gguf_type.upper()}.gguf"
            path.unlink(missing_ok=True)
            cost = measure([python, "-c", _QUANTIZE, str(bf16), str(path), gguf_type])
            record(
                {"tool": "llama_model_quantize", "type": gguf_type, **cost, "file_bytes": path.stat().st_size}
            )
            both = {
                "wall_s": convert["wall_s"] + cost["wall_s"],
                "cpu_s": convert["cpu_s"] + cost["cpu_s"],
                "peak_rss": max(convert["peak_rss"], cost["peak_rss"]),
            }
            record({"tool": "llama.cpp (convert + quantize)", "type": gguf_type, **both})
            record({"compare": gguf_type, **compare(work / f"hubmerge-{gguf_type.upper()}.gguf", path)})
    saved.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
