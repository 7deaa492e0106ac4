"""Compare two merged checkpoints tensor by tensor, streaming (one tensor of each side in RAM).

Prints one JSON line: tensors compared, names only on one side, max abs diff, max bf16 ulp distance,
the share of elements that differ, and the worst tensor.

    /work/venv/bin/python bench/compare.py OUT_A OUT_B [--label NAME]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def tensor_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    result = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            result.update({k: f for k in h.keys()})  # noqa: SIM118 - safe_open is not iterable
    return result


def ordered(bits: torch.Tensor) -> torch.Tensor:
    """bf16/f16 bit patterns as integers that order like the values (+0 and -0 both 0)."""
    b = bits.to(torch.int32)
    return torch.where(b >= 0, b, -(b & 0x7FFF))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--label", default="")
    args = p.parse_args(argv)
    fa, fb = tensor_files(args.a), tensor_files(args.b)
    common = sorted(set(fa) & set(fb))
    max_abs, max_ulp, differing, total = 0.0, 0, 0, 0
    worst = ("", 0.0)
    dtypes = set()
    handles: dict[Path, object] = {}

    def get(path: Path, name: str) -> torch.Tensor:
        if path not in handles:
            handles[path] = safe_open(path, "pt").__enter__()
        return handles[path].get_tensor(name)  # type: ignore[attr-defined]

    for name in common:
        x, y = get(fa[name], name), get(fb[name], name)
        dtypes.add((str(x.dtype), str(y.dtype)))
        if x.shape != y.shape:
            print(
                json.dumps(
                    {"label": args.label, "error": f"{name}: shape {list(x.shape)} vs {list(y.shape)}"}
                )
            )
            return 1
        total += x.numel()
        diff = (x.float() - y.float()).abs()
        m = float(diff.max()) if diff.numel() else 0.0
        differing += int((diff != 0).sum())
        if x.dtype == y.dtype and x.element_size() == 2:
            u = int((ordered(x.view(torch.int16)) - ordered(y.view(torch.int16))).abs().max())
            max_ulp = max(max_ulp, u)
        if m > max_abs:
            max_abs, worst = m, (name, m)
        del x, y, diff
    print(
        json.dumps(
            {
                "label": args.label,
                "tensors_compared": len(common),
                "only_in_a": sorted(set(fa) - set(fb)),
                "only_in_b": sorted(set(fb) - set(fa)),
                "dtypes": sorted(map(list, dtypes)),
                "elements": total,
                "max_abs_diff": max_abs,
                "max_ulp_bf16": max_ulp,
                "fraction_differing": differing / total if total else 0.0,
                "worst_tensor": worst[0],
            }
        )
    )
    return 0 if common and not (set(fa) ^ set(fb)) else 1


if __name__ == "__main__":
    sys.exit(main())
