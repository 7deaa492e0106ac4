"""CPU time of TIES's hot loops, torch path against the compiled kernels (`hubmerge/kernels.py`), on one real
tensor of the bench's checkpoints, in the pieces the engine uses; and that both give the same bits.

    python bench/make_checkpoints.py --shape 1.5b          # or any base + 3 bf16 checkpoint folders
    python bench/kernels.py bench/work/models-1.5b [--tensor model.layers.5.mlp.down_proj.weight]

Prints one line per loop: process CPU seconds (one thread) for the |τ| rows, the count of |τ| against a
bracket of the cut-off (the selection's pass) and the merge step, each the best of `--repeats`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's hubmerge

from hubmerge.methods import METHODS, Slice
from hubmerge.methods._gta import magnitudes
from hubmerge.selection import kth_smallest

PIECE = 1 << 18  # engine._PIECE_ELEMENTS
PARAMS = {"scaling_factor": 0.8, "merge_func": "sum", "threshold": 20.0, "trim": "global"}


def best(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", type=Path, help="folder with base/, math/, coder/, instruct/")
    parser.add_argument("--tensor", default="model.layers.5.mlp.down_proj.weight")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tensors = []
    for name in ("base", "math", "coder", "instruct"):
        with safe_open(str(args.models / name / "model.safetensors"), "pt") as f:
            tensors.append(f.get_tensor(args.tensor).flatten())
    base, models = tensors[0].float(), tuple(tensors[1:])
    n = base.numel()

    def pieces() -> list[Slice]:
        return [
            Slice(
                "t", (n,), 0, base[i : i + PIECE], tuple(m[i : i + PIECE] for m in models), PARAMS, ({},) * 3
            )  # type: ignore[arg-type]
            for i in range(0, n, PIECE)
        ]

    whole = magnitudes(pieces()[0], {})
    cut_rank = n - int(n * 0.2)
    results: dict[str, dict[str, object]] = {}
    for mode in ("torch", "auto"):
        os.environ["HUBMERGE_KERNELS"] = mode
        rows = [magnitudes(s, {}) for s in pieces()]
        sample = torch.cat(rows, dim=1)[:, ::64]
        from hubmerge.selection import bracket

        brackets = bracket(sample, [cut_rank] * 3, n)
        cuts = kth_smallest(lambda: rows, [cut_rank] * 3, brackets)  # noqa: B023
        out = [METHODS["ties"].merge(s, {"cut": cuts}) for s in pieces()]
        results[mode] = {
            "|τ|": best(lambda: [magnitudes(s, {}) for s in pieces()], args.repeats),
            "count": best(lambda: kth_smallest(lambda: rows, [cut_rank] * 3, brackets), args.repeats),  # noqa: B023
            "merge": best(lambda: [METHODS["ties"].merge(s, {"cut": cuts}) for s in pieces()], args.repeats),  # noqa: B023
            "bits": (cuts, [o.values.view(torch.int32) for o in out]),
        }
    same = results["torch"]["bits"][0] == results["auto"]["bits"][0] and all(  # type: ignore[index]
        torch.equal(a, b)
        for a, b in zip(results["torch"]["bits"][1], results["auto"]["bits"][1], strict=True)  # type: ignore[index]
    )
    print(f"{args.tensor}: {n:,} positions × 3 models, pieces of {PIECE:,}; {whole.shape} sample rows")
    for loop in ("|τ|", "count", "merge"):
        t, k = results["torch"][loop], results["auto"][loop]
        print(f"  {loop:6s} torch {t:.3f} s   kernels {k:.3f} s   ({t / k:.1f}×)")  # type: ignore[operator]
    print(f"  same cut-offs and merged bits: {same}")


if __name__ == "__main__":
    main()
