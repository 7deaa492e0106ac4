"""TIES merging as FusionBench's `TiesMergingAlgorithm` implements it (Yadav et al. 2023, arXiv:2306.01708).

θ = θ_base + λ · disjoint_merge(elect(trim(τ))): each task vector τᵢ keeps its entries with |τᵢ| at or
above the k-th smallest magnitude of the whole model (`trim = "global"`, FusionBench's `topk_values_mask`
over one flattened vector) or of each tensor (`trim = "tensor"`); the elected sign is sign(Σ trimmed τ);
the agreeing entries are summed (`merge_func = "sum"`, FusionBench's default), averaged or maxed. Where
the elected sign is exactly 0, FusionBench uses the majority sign of the whole model: `merge` leaves those
positions open (`Deferred`) and `_decide` settles them after the last shard, or the `majority` pass first.
mergekit's TIES (per-tensor density, weights, normalize) is `mergekit_ties`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ._gta import TIES, magnitudes
from .base import (
    Contract,
    Deferral,
    Deferred,
    FusionBenchConfig,
    Method,
    Param,
    Reduce,
    Select,
    Slice,
    Stats,
    cpu_array,
    trim_,
)
from .task_arithmetic import SCALING

if TYPE_CHECKING:
    from collections.abc import Mapping

    from torch import Tensor

    from ..schedule import Setting


def ties_keep_count(numel: int, threshold: float) -> int:
    """Rank k (1-based, ascending |τ|) of the magnitude cut-off: entries with |τ| >= the k-th smallest stay.

    FusionBench's `topk_values_mask`: a threshold above 1 is a percentage, k = d - int(d·K). k = 0 means
    "keep everything" (FusionBench would crash on kthvalue(0)).
    """
    fraction = threshold / 100 if threshold > 1 else threshold
    return numel - int(numel * fraction)


def _disjoint_merge(task_vectors: Tensor, sign: Tensor, merge_func: str) -> Tensor:
    import torch

    keep = torch.where(sign > 0, task_vectors > 0, task_vectors < 0)
    selected = task_vectors * keep
    if merge_func == "sum":
        return selected.sum(dim=0)
    if merge_func == "mean":
        count = (selected != 0).sum(dim=0).to(selected.dtype)
        return selected.sum(dim=0) / count.clamp(min=1)
    return selected.abs().amax(dim=0) * sign  # "max"


def _elected_sum(task_vectors: Tensor, total: Tensor) -> Tensor:
    """`_disjoint_merge(task_vectors, sign(total) with 0 -> +1, "sum")`, bit for bit, in fewer passes.

    Consumes `task_vectors` (its buffer is reused). With s = ±1 the sign of `total`, the agreeing entries
    of a position are those with s·τᵢ > 0, so the merge is s · Σᵢ max(s·τᵢ, 0), summed in model order as
    FusionBench sums. Multiplying by ±1 is exact and rounding is symmetric, so for s = -1 this is
    Σᵢ min(τᵢ, 0) to the bit; the zeros that stand for disagreeing entries change no bit of a sum that
    has a non-zero term, and a sum of zeros only meets a base of +0 (τ = -0 needs base +0), where the
    signed zero is lost in the final + base. No boolean mask and no `where`: on a CPU those are 5-15×
    slower than these arithmetic passes (bench/RESULTS.md). `tests/test_fast_paths.py` holds it to
    FusionBench's formula, signed zeros included.
    """
    import torch

    sign = torch.copysign(torch.ones((), dtype=total.dtype, device=total.device), total)
    task_vectors.mul_(sign).clamp_(min=0)
    return task_vectors.sum(dim=0).mul_(sign)


def _trimmed(s: Slice, stats: Stats) -> tuple[Tensor, Tensor]:
    """The trimmed task vectors, one (n, ...) buffer, and their sum Σ trimmed τ."""
    import torch  # here, not at module level: `hubmerge validate` reads the registry without loading torch

    assert s.base is not None
    base = s.base
    task_vectors = torch.empty((len(s.models), *base.shape), dtype=base.dtype, device=base.device)
    for row, model, cut in zip(task_vectors, s.models, stats["cut"], strict=True):
        torch.sub(model, base, out=row)
        trim_(row, cut)
    return task_vectors, task_vectors.sum(dim=0)


def _at(s: Slice, positions: Tensor) -> Slice:
    """The slice's inputs at some flat positions only (a 1-D slice of them)."""
    assert s.base is not None
    return replace(
        s, base=s.base.flatten()[positions], models=tuple(m.flatten()[positions] for m in s.models)
    )


def _sign_sum(total: Tensor) -> int:
    """Σ sign(total): the positive entries less the negative ones, counted exactly (a NaN counts as neither)."""
    import numpy as np
    import torch

    values = cpu_array(total)
    if values is not None:
        return int(np.count_nonzero(values > 0)) - int(np.count_nonzero(values < 0))
    return int(torch.count_nonzero(total > 0)) - int(torch.count_nonzero(total < 0))


def _open_positions(total: Tensor, merged: Tensor) -> Tensor:
    """The flat positions where Σ trimmed τ is exactly 0 and the merge under a +1 sign is > 0."""
    import numpy as np
    import torch

    a, b = cpu_array(total), cpu_array(merged)
    if a is not None and b is not None:
        return torch.from_numpy(np.flatnonzero((a == 0) & (b > 0)))
    return ((total == 0) & (merged > 0)).flatten().nonzero().flatten()


def majority(s: Slice, stats: Stats, accumulator: int | None) -> int:
    """The `settle` pass: Σ sign(Σ trimmed τ) over the whole model, whose sign is the majority sign."""
    return (accumulator or 0) + _sign_sum(_trimmed(s, stats)[1])


def _decide(sign_sum: int) -> int | None:
    """The open positions' outcome from Σ sign(Σ trimmed τ) over the model (the tallies of `merge`'s
    `Deferred` results): None under a +1 majority (as written), else the alternative of -1 (0) or of 0 (1)."""
    return None if sign_sum > 0 else 0 if sign_sum < 0 else 1


def merge(s: Slice, stats: Stats) -> Deferred | Tensor:
    """Trim each τᵢ to |τᵢ| >= its cut-off, elect sign(Σ trimmed τ), merge the agreeing entries.

    With the `majority` pass's result in `stats`, the positions that need the majority sign get their
    value here (a tensor); without it, a `Deferred` leaves them open: `values` as under a +1 majority,
    the alternatives under -1 and 0, and this slice's Σ sign as the tally (`_decide`). Both write the
    same values: each position's candidates are computed by the same operations either way.
    """
    import torch

    assert s.base is not None
    base = s.base
    scaling_factor, merge_func = float(s.params["scaling_factor"]), str(s.params["merge_func"])
    task_vectors, total = _trimmed(s, stats)
    if merge_func == "sum":
        merged = _elected_sum(task_vectors, total)
        # Undecided: Σ trimmed τ is exactly 0 while some τᵢ is not, so both signs occur. There the elected
        # sign was +1 and `merged` is Σ max(τᵢ, 0), > 0 exactly then.
        undecided = _open_positions(total, merged)
    else:
        sign = torch.sign(total)
        zero = sign == 0
        undecided = (zero & (task_vectors != 0).any(dim=0)).flatten().nonzero().flatten()
        merged = _disjoint_merge(task_vectors, torch.where(zero, 1.0, sign), merge_func)
    values = merged.mul_(scaling_factor).add_(base)  # base + λ·merged, rounded as written
    settled = stats.get("majority")
    if settled is not None and (settled > 0 or not undecided.numel()):
        return values  # the +1 the merge assumed is the majority, or nothing waits for it

    if settled is None and not undecided.numel():
        return Deferred(values, _sign_sum(total), undecided, (base.new_empty(0), base.new_empty(0)))
    b = base.flatten()[undecided]
    # Their trimmed τ again, by the same operations on the same values (the merge consumed the buffer).
    vectors = _trimmed(_at(s, undecided), stats)[0]

    def under(majority: float) -> Tensor:
        """The undecided positions' values under a majority sign of `majority` (-1 or 0)."""
        return b + scaling_factor * _disjoint_merge(vectors, torch.full_like(b, majority), merge_func)

    if settled is not None:
        values.view(-1)[undecided] = under(-1.0 if settled < 0 else 0.0)
        return values
    negative = under(-1.0)
    # A majority of 0 keeps the entries below 0 as -1 does (`_disjoint_merge`), except for "max", whose
    # result it multiplies by 0.
    return Deferred(
        values, _sign_sum(total), undecided, (negative, under(0.0) if merge_func == "max" else negative)
    )


def _ranks(numel: int, s: Slice) -> list[int]:
    return [ties_keep_count(numel, float(s.params["threshold"]))] * len(s.models)


def _trim(mode: str) -> Any:
    return lambda params, models: params["trim"] == mode


def _advise(params: Mapping[str, Setting]) -> tuple[str, ...]:
    if params.get("threshold") == 1:
        return (
            "parameters.threshold = 1 is read as the fraction 1.0, keeping 100 % of each task vector (as "
            "FusionBench reads it); for 1 percent write 0.01",
        )
    return ()


METHOD = Method(
    name="ties",
    title="TIES merging",
    formula="θ = θ_base + λ · disjoint_merge(elect_sign(trim(θᵢ − θ_base, top threshold %)))",
    contract=Contract(base="required"),
    merge=merge,
    params=(
        SCALING,
        Param(
            "threshold",
            float,
            20.0,
            "percent of each task vector kept, by magnitude (a value <= 1 is a fraction, as in FusionBench)",
            minimum=0.0,
            maximum=100.0,
            per_tensor=False,
        ),
        Param(
            "merge_func",
            str,
            "sum",
            "how agreeing entries combine",
            choices=("sum", "mean", "max"),
            per_tensor=False,
        ),
        Param(
            "trim",
            str,
            "global",
            "rank magnitudes over the whole model or per tensor",
            choices=("global", "tensor"),
            per_tensor=False,
        ),
    ),
    passes=(
        Select("cut", magnitudes, _ranks, scope="model", when=_trim("global")),
        Select("cut", magnitudes, _ranks, scope="tensor", when=_trim("tensor")),
    ),
    paper="arXiv:2306.01708",
    fusionbench="TiesMergingAlgorithm",
    notes="FusionBench's TIES: one magnitude cut over the whole model, λ = `scaling_factor`, no weights. "
    "mergekit's TIES is `mergekit_ties`. Where the elected sign is exactly 0, the model-wide majority sign "
    "decides, patched into the written shards at the end; when shards are deleted as soon as they are "
    "uploaded (a disk budget smaller than the output), one more read settles that sign before the merge.",
    cuts="cut",
    # The majority sign settles the undecided positions: their values under -1 and under 0 wait in the
    # scratch file, estimated at 1 % of the positions (0.6 % measured on bf16 fine-tunes of the 1.5B shape,
    # bench/RESULTS.md).
    deferral=Deferral(
        _decide, settle=Reduce("majority", majority, scope="model"), alternatives=2, open_percent=1
    ),
    advise=_advise,
    citation=TIES,
    fusionbench_config=FusionBenchConfig(
        "linear/ties_merging_for_causallm",
        {"scaling_factor": 0.8, "threshold": 20.0, "merge_func": "sum", "trim": "global"},
        overrides=("scaling_factor",),
    ),
    key_hints={
        key: f"hubmerge's ties is FusionBench's (scaling_factor, threshold), without {key}: for mergekit's "
        'TIES, with density and a weight per model, write method = "mergekit_ties"'
        for key in ("density", "weight")
    },
    description="`trim` keeps the entries of each task vector θᵢ − θ_base whose magnitude is in its top "
    '`threshold` percent (ranked over the whole model when `trim` is "global", within each tensor when '
    '"tensor"), `elect_sign` takes the sign of the sum of the trimmed task vectors, and `disjoint_merge` '
    "combines the entries that agree with that sign with `merge_func`, as FusionBench's "
    "`TiesMergingAlgorithm` does.",
)
