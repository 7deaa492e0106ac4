"""SCE: select, calculate, erase (Wan et al. 2024, FuseChat, arXiv:2408.07990), mergekit's `sce`.

Per tensor, with τᵢ = θᵢ − θ_base:

1. select: when `select_topk` < 1, keep the k = int(nz · select_topk) positions with the largest variance
   of the τᵢ across the models (population variance, nz: positions where it is not 0), in every τᵢ;
2. calculate: model i's weight is the mean of its selected τᵢ² over the whole tensor, normalised to sum
   to 1 (uniform when the means sum below 10⁻⁶);
3. erase: where an entry's sign differs from sign(Σᵢ τᵢ) (0 counts as +), it drops out;
θ = θ_base + Σᵢ mᵢ wᵢ τᵢ / max(Σᵢ mᵢ wᵢ, 10⁻⁶), mᵢ the erase mask.

Passes: `nonzero` counts nz and `cut` finds the k-th largest variance exactly (only when some
`select_topk` is below 1), `energy` sums the selected τᵢ² per model; the merge step is then elementwise.
Every per-element operation is mergekit's, in its order, so float32 results match bit for bit except
through the weights: mergekit's mean is torch's float32 sum over the whole tensor, streamed here as a
float64 sum rounded once, which can differ from it in the last bit (a relative 10⁻⁷ on the result).
Positions tied with the k-th largest variance are all kept, where torch.topk keeps an arbitrary k.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..schedule import scalars
from .base import Citation, Contract, MergekitParams, Method, Param, Reduce, Select, Slice, Stats

if TYPE_CHECKING:
    from torch import Tensor


def _task_vectors(s: Slice) -> Tensor:
    import torch

    assert s.base is not None
    return torch.stack([m - s.base for m in s.models])


def _variance(task_vectors: Tensor) -> Tensor:
    import torch

    return torch.var(task_vectors, dim=0, unbiased=False)


def _selects(s: Slice) -> bool:
    return float(s.params["select_topk"]) < 1


def _keep_count(s: Slice, stats: Stats) -> int:
    return int(stats["nonzero"] * float(s.params["select_topk"]))


def _count_nonzero(s: Slice, stats: Stats, count: Any) -> int:
    import torch

    found = int(torch.count_nonzero(_variance(_task_vectors(s)))) if _selects(s) else 0
    return (count or 0) + found


def _variance_row(s: Slice, stats: Stats) -> Tensor:
    import torch

    return _variance(_task_vectors(s)).reshape(1, -1).to("cpu", torch.float32)


def _rank(numel: int, s: Slice, stats: Stats) -> list[int]:
    """The k-th largest variance is the (numel − k + 1)-th smallest; 0 (no cut) when nothing is selected."""
    k = _keep_count(s, stats) if _selects(s) and float(s.params["select_topk"]) > 0 else 0
    return [numel - k + 1 if k else 0]


def _selected(s: Slice, stats: Stats) -> Tensor:
    """τᵢ with the selection applied, as mergekit multiplies them by its 0/1 mask."""
    task_vectors = _task_vectors(s)
    if not _selects(s):
        return task_vectors
    if float(s.params["select_topk"]) <= 0 or _keep_count(s, stats) == 0:
        mask = task_vectors.new_zeros(task_vectors.shape[1:])
    else:
        mask = (_variance(task_vectors) >= stats["cut"][0]).to(task_vectors.dtype)
    return task_vectors * mask.unsqueeze(0)


def _energy(s: Slice, stats: Stats, sums: Any) -> Tensor:
    """Per model, Σ τᵢ² over the selected entries, in float64 (each square rounded in float32, as mergekit's)."""
    import torch

    squares = _selected(s, stats).square().flatten(1).sum(dim=1, dtype=torch.float64)
    return squares if sums is None else sums + squares


def _weights(s: Slice, stats: Stats) -> Tensor:
    import torch

    means = (stats["energy"] / s.numel).to(torch.float32)
    total = float(torch.sum(means).item())
    weights: Tensor = torch.ones_like(means) / means.shape[0] if abs(total) < 1e-6 else means / total
    return weights


def merge(s: Slice, stats: Stats) -> Tensor:
    import torch

    assert s.base is not None
    task_vectors = _selected(s, stats)
    majority = (task_vectors.sum(dim=0) >= 0).to(task_vectors.dtype) * 2 - 1
    agrees = task_vectors.sign() == majority
    weights = _weights(s, stats).to(task_vectors.device)
    erased = weights.view(-1, *([1] * (task_vectors.dim() - 1))) * agrees
    merged = (task_vectors * erased).sum(dim=0)
    return s.base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


def _some_selection(params: Any, models: object = ()) -> bool:
    return any(float(v) < 1 for v in scalars(params.get("select_topk", 1.0)))


METHOD = Method(
    name="sce",
    title="SCE merging",
    formula="θ = θ_base + Σᵢ mᵢ wᵢ top_k(τᵢ) / Σᵢ mᵢ wᵢ, wᵢ ∝ mean(top_k(τᵢ)²), mᵢ = [sign τᵢ = sign Σⱼ τⱼ]",
    contract=Contract(base="required"),
    merge=merge,
    params=(
        Param(
            "select_topk",
            float,
            1.0,
            "fraction of positions kept, those whose task vectors vary most across the models (1: all)",
            minimum=0.0,
            maximum=1.0,
        ),
    ),
    passes=(
        Reduce("nonzero", _count_nonzero, when=_some_selection),
        Select("cut", _variance_row, _rank, when=_some_selection, ranks_use_stats=True),
        Reduce("energy", _energy),
    ),
    paper="arXiv:2408.07990",
    mergekit="sce",
    mergekit_params=MergekitParams(shared={"int8_mask": False, "select_topk": 1.0}),
    citation=Citation(
        "Wan et al. 2024",
        "FuseChat: Knowledge Fusion of Chat Models",
        "Fanqi Wan and Longguang Zhong and Ziyi Yang and Ruijun Chen and Xiaojun Quan",
        2024,
        "wan2024fusechat",
    ),
    description="`top_k` keeps, in every task vector τᵢ = θᵢ − θ_base, the `select_topk` fraction of positions "
    "where the task vectors vary most across the models (all of them at 1); wᵢ is the mean square of model i's "
    "kept entries over the tensor, normalised to sum to 1; mᵢ drops the entries whose sign differs from that of "
    "Σⱼ τⱼ, as in TIES.",
    symbols=(("mᵢ", "the sign-agreement mask of model i"), ("wᵢ", "the weight of model i, from its tensor")),
    notes="mergekit's `int8_mask` only changes the mask's memory and is not needed here. Positions tied with "
    "the k-th largest variance are all kept (torch.topk keeps an arbitrary k of them). The weights wᵢ are "
    "sums over the whole tensor, accumulated slice by slice: in float32 the result is within 1e-6 of the "
    "tensor's largest magnitude of mergekit's, not bit for bit.",
)
