"""hubmerge and FusionBench outputs against an independent float32 reference and a bf16 replica of FusionBench.

FusionBench 0.2.33 computes in the models' dtype (bf16 with its Qwen2.5 pools), rounding after every
operation; hubmerge computes in float32 and rounds once. For one method this computes, straight from the
input safetensors files,
  - fp32: the method's formula in float32, rounded to bf16 once at the end,
  - replica: the same formula as FusionBench evaluates it, in bf16, every operation rounded
    (sequential sums; TIES flattened over all keys sorted by name),
and prints one JSON line with the max abs diff and the share of differing elements of hubmerge vs
FusionBench, hubmerge vs fp32, FusionBench vs fp32 and replica vs FusionBench (0 when the replica
reproduces FusionBench bit for bit).

The formulas (FusionBench's, see its `SimpleAverageAlgorithm`, `TaskArithmeticAlgorithm`,
`TiesMergingAlgorithm`): simple_average = (1/n) Σ θₜ over the fine-tunes, base excluded;
task_arithmetic = θ₀ + λ·Σₜ(θₜ − θ₀); ties = θ₀ + λ·Σ(agreeing trimmed τₜ), each τₜ = θₜ − θ₀ keeping its
top `threshold` % by magnitude over the whole model (one global cut per task, ties with the cut-off kept),
the elected sign = sign(Σ trimmed τ) (0 -> the sign of the sum of all signs), `sum` merge.

The comparison covers the source checkpoints' keys. A `lm_head.weight` that an output has but the sources
do not (tied embeddings: FusionBench's lazy pool saves an uninitialised one) is skipped and listed.

Memory: simple_average and task_arithmetic go tensor by tensor; TIES holds the base and every fine-tune
flattened (bf16) plus an (n, d) float32 task-vector matrix, about 24 bytes per parameter and fine-tune:
meant for bench's 0.1b shape (123 M parameters), not for 0.5B/1.5B.

    python bench/fusionbench_check.py ties --base B --models M1,M2,M3 --hubmerge OUT --fusionbench OUT/checkpoint \\
        --scaling-factor 0.8 --threshold 20 --merge-func sum
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from compare import tensor_files
from safetensors import safe_open

PAIRS = ("hubmerge_vs_fusionbench", "hubmerge_vs_fp32", "fusionbench_vs_fp32", "replica_vs_fusionbench")


class Files:
    """Tensors by name from a checkpoint folder (single file or sharded), handles kept open."""

    def __init__(self, folder: Path) -> None:
        self.where = tensor_files(folder)
        self.handles: dict[Path, object] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self.where[name]
        if path not in self.handles:
            self.handles[path] = safe_open(path, "pt").__enter__()
        return self.handles[path].get_tensor(name)  # type: ignore[attr-defined]


class Diff:
    def __init__(self) -> None:
        self.max_abs, self.differing, self.elements = 0.0, 0, 0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        diff = (a.float() - b.float()).abs()
        if diff.numel():
            self.max_abs = max(self.max_abs, float(diff.max()))
        self.differing += int(torch.count_nonzero(diff))
        self.elements += diff.numel()

    def result(self) -> dict[str, float]:
        share = self.differing / self.elements if self.elements else 0.0
        return {"max_abs_diff": self.max_abs, "fraction_differing": share}


def simple_average(fts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    acc = fts[0].to(dtype)
    for t in fts[1:]:
        acc = acc + t.to(dtype)  # FusionBench: state_dict_add, model after model
    return acc / len(fts)  # then state_dict_div once


def task_arithmetic(
    base: torch.Tensor, fts: list[torch.Tensor], lam: float, dtype: torch.dtype
) -> torch.Tensor:
    b = base.to(dtype)
    tv = None
    for t in fts:
        d = t.to(dtype) - b
        tv = d if tv is None else tv + d
    assert tv is not None
    return b + lam * tv


def ties(
    base: torch.Tensor, fts: list[torch.Tensor], lam: float, k_pct: float, merge_func: str, dtype: torch.dtype
) -> torch.Tensor:
    """FusionBench's `TiesMergingAlgorithm` on flat vectors (keys sorted by name), computed in `dtype`.

    Row by row where FusionBench works on the whole (n, d) matrix at once; each row's operations are the
    same element-wise ones, so in bf16 the bits are the same.
    """
    pt = base.to(dtype)
    n, d = len(fts), pt.numel()
    tv = torch.empty((n, d), dtype=dtype)
    fraction = k_pct / 100 if k_pct > 1 else k_pct  # topk_values_mask: a threshold above 1 is a percentage
    for row, t in zip(tv, fts, strict=True):
        torch.sub(t.to(dtype), pt, out=row)
        kth = row.abs().kthvalue(d - int(d * fraction)).values
        row.mul_(row.abs() >= kth)  # keep |τ| >= the cut-off (ties kept), as `tv * mask`
    sign = torch.sign(tv.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    for row in tv:
        row.mul_(torch.where(sign > 0, row > 0, row < 0))  # disjoint merge: the agreeing entries
    if merge_func == "sum":
        agg = tv.sum(dim=0)
    elif merge_func == "mean":
        agg = tv.sum(dim=0) / (tv != 0).sum(dim=0).clamp(min=1)
    else:
        agg = tv.abs().max(dim=0).values * sign
    del tv
    return pt + lam * agg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("method", choices=("simple_average", "task_arithmetic", "ties"))
    p.add_argument("--base", type=Path, help="the base checkpoint folder (task_arithmetic, ties)")
    p.add_argument("--models", required=True, help="comma-separated fine-tune folders, in merge order")
    p.add_argument("--hubmerge", type=Path, required=True, help="hubmerge's output folder")
    p.add_argument("--fusionbench", type=Path, required=True, help="FusionBench's <log_dir>/checkpoint")
    p.add_argument("--scaling-factor", type=float, default=0.8)
    p.add_argument("--threshold", type=float, default=20)
    p.add_argument("--merge-func", default="sum", choices=("sum", "mean", "max"))
    args = p.parse_args(argv)
    if args.method != "simple_average" and args.base is None:
        p.error(f"{args.method} needs --base")

    fts = [Files(Path(m)) for m in args.models.split(",")]
    base = Files(args.base) if args.base else None
    hub, fb = Files(args.hubmerge), Files(args.fusionbench)
    keys = sorted((base or fts[0]).where)
    skipped = [k for k in ("lm_head.weight",) if k not in keys and (k in fb.where or k in hub.where)]
    problems = [
        f"{side}: {sorted(set(keys) ^ (set(files.where) - set(skipped)))}"
        for side, files in (("hubmerge", hub), ("fusionbench", fb))
        if set(keys) != set(files.where) - set(skipped)
    ]
    if problems:
        print(
            json.dumps({"method": args.method, "error": "keys differ from the sources", "detail": problems})
        )
        return 1
    diffs = {pair: Diff() for pair in PAIRS}

    def record(name: str, replica: torch.Tensor, reference: torch.Tensor) -> None:
        h, f = hub[name], fb[name]
        diffs["hubmerge_vs_fusionbench"].add(h, f)
        diffs["hubmerge_vs_fp32"].add(h, reference)
        diffs["fusionbench_vs_fp32"].add(f, reference)
        diffs["replica_vs_fusionbench"].add(replica, f)

    bf16, fp32 = torch.bfloat16, torch.float32
    lam = args.scaling_factor
    if args.method == "ties":
        assert base is not None
        b = torch.cat([base[k].reshape(-1) for k in keys])
        models = [torch.cat([m[k].reshape(-1) for k in keys]) for m in fts]
        replica = ties(b, models, lam, args.threshold, args.merge_func, bf16)
        reference = ties(b, models, lam, args.threshold, args.merge_func, fp32).to(bf16)
        del b, models
        offset = 0
        for k in keys:
            shape = hub[k].shape
            n = shape.numel()
            record(k, replica[offset : offset + n].view(shape), reference[offset : offset + n].view(shape))
            offset += n
    else:
        for k in keys:
            inputs = [m[k] for m in fts]
            if args.method == "simple_average":
                replica, reference = simple_average(inputs, bf16), simple_average(inputs, fp32).to(bf16)
            else:
                assert base is not None
                replica = task_arithmetic(base[k], inputs, lam, bf16)
                reference = task_arithmetic(base[k], inputs, lam, fp32).to(bf16)
            record(k, replica, reference)
    print(
        json.dumps(
            {
                "method": args.method,
                "tensors": len(keys),
                "elements": diffs[PAIRS[0]].elements,
                "skipped": skipped,
                **{pair: diffs[pair].result() for pair in PAIRS},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
