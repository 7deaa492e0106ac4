"""Merge methods: the math, in one place, as pure functions of float32 tensors.

Each method sees one chunk of one tensor at a time: `base` (or None) and the models' chunks. The first
of them (`base`, else the first model) arrives upcast to float32 (float64 stays float64) by the engine,
which owns reading, dtypes, chunking and devices; the others may stay in their stored dtype (bf16, f16):
every operation below pairs them with a float32 tensor, so type promotion computes exactly what upcast
copies would, without writing and re-reading those copies. A method never reads files. The registry at the bottom declares each method's parameters,
so a recipe is validated before any weight is read.

Formulas (θ: parameters, τᵢ = θᵢ − θ_base: task vectors, λ: scaling_factor):

- simple_average   θ = (1/n) Σ θᵢ                       FusionBench `SimpleAverageAlgorithm` (base excluded)
- linear           θ = Σ wᵢ θᵢ / Σ wᵢ                   mergekit `linear` with normalize on
- task_arithmetic  θ = θ_base + λ Σ wᵢ τᵢ                Ilharco et al. 2023, arXiv:2212.04089
- ties             θ = θ_base + λ · disjoint_merge(elect(trim(τ)))
                                                         Yadav et al. 2023, arXiv:2306.01708, as FusionBench
                                                         `TiesMergingAlgorithm` implements it (trim over the
                                                         whole model, merge_func "sum" by default)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["METHODS", "Method", "Param", "TiesChunk", "get_method", "ties_keep_count"]

ParamValue = float | int | str | bool


@dataclass(frozen=True)
class Param:
    """A declared method parameter: its type, default and allowed values."""

    name: str
    type: type
    default: ParamValue
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    def check(self, value: Any) -> str | None:
        """Return why `value` is not acceptable, or None."""
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.type) or (self.type is not bool and isinstance(value, bool)):
            return f"must be a {self.type.__name__}, got {value!r}"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(map(repr, self.choices))}, got {value!r}"
        number = value if isinstance(value, (int, float)) else None
        if isinstance(number, float) and not math.isfinite(number):  # TOML has nan and inf literals
            return f"must be a finite number, got {value!r}"
        if self.minimum is not None and number is not None and number < self.minimum:
            return f"must be >= {self.minimum}, got {value!r}"
        if self.maximum is not None and number is not None and number > self.maximum:
            return f"must be <= {self.maximum}, got {value!r}"
        return None


@dataclass(frozen=True)
class Method:
    """A registered merge method and what a recipe may say to it."""

    name: str
    title: str
    formula: str
    needs_base: bool
    params: tuple[Param, ...] = ()
    model_params: tuple[Param, ...] = ()
    paper: str | None = None
    trims: bool = field(default=False)  # needs per-model magnitude thresholds (a pass over the task vectors)

    def resolve(self, given: Mapping[str, Any]) -> dict[str, ParamValue]:
        """Method parameters with defaults filled in (`given` was validated by the recipe)."""
        values: dict[str, ParamValue] = {p.name: p.default for p in self.params}
        for name, value in given.items():
            values[name] = (
                float(value) if isinstance(value, int) and self.param(name).type is float else value
            )
        return values

    def param(self, name: str) -> Param:
        return next(p for p in self.params + self.model_params if p.name == name)


# --- the math ------------------------------------------------------------------------------------------


def simple_average(models: Sequence[Tensor]) -> Tensor:
    # Sum in order, divide once: FusionBench's state_dict_add / state_dict_div.
    total = models[0].clone()
    for m in models[1:]:
        total += m
    return total.div_(len(models))


def linear(models: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    import torch

    total = models[0] * weights[0]
    scratch = torch.empty_like(total)
    for m, w in zip(models[1:], weights[1:], strict=True):
        total += scratch.copy_(m).mul_(w)  # m · w rounded in float32, as for an upcast m
    return total.div_(sum(weights))


def task_arithmetic(
    base: Tensor, models: Sequence[Tensor], weights: Sequence[float], scaling_factor: float
) -> Tensor:
    import torch

    # Deltas accumulate one after another, then scale, then add: FusionBench's order of operations.
    task_vector = models[0] - base
    if weights[0] != 1.0:
        task_vector.mul_(weights[0])
    scratch = torch.empty_like(task_vector)
    for m, w in zip(models[1:], weights[1:], strict=True):
        torch.sub(m, base, out=scratch)
        task_vector += scratch.mul_(w) if w != 1.0 else scratch
    return task_vector.mul_(scaling_factor).add_(base)  # base + λ·τ, rounded as written


def ties_keep_count(numel: int, threshold: float) -> int:
    """Rank k (1-based, ascending |τ|) of the magnitude cut-off: entries with |τ| >= the k-th smallest stay.

    FusionBench's `topk_values_mask`: a threshold above 1 is a percentage, k = d - int(d·K). k = 0 means
    "keep everything" (FusionBench would crash on kthvalue(0)).
    """
    fraction = threshold / 100 if threshold > 1 else threshold
    return numel - int(numel * fraction)


@dataclass(frozen=True)
class TiesChunk:
    """A TIES result for one chunk, assuming the global majority sign is +1.

    Where the elected sign is exactly 0 but some trimmed τ is not, FusionBench falls back to the majority
    sign of the whole model, known only after the last chunk. `undecided` holds those flat positions and
    `if_negative` / `if_zero` the values they take when the majority turns out -1 or 0; the engine patches
    them at the end. `sign_sum` is this chunk's contribution to the majority.
    """

    values: Tensor
    sign_sum: int
    undecided: Tensor
    if_negative: Tensor
    if_zero: Tensor


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


def _elected_sum(task_vectors: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
    """`_disjoint_merge(task_vectors, sign(total) with 0 -> +1, "sum")`, bit for bit, in fewer passes.

    Also returns Σ max(τᵢ, 0), which is > 0 exactly where some τᵢ is positive.

    The agreeing entries of a +1 position are the positive τᵢ, of a -1 position the negative ones, so the
    two candidate sums are Σ max(τᵢ, 0) and Σ min(τᵢ, 0) in model order. Adding the zeros that stand for
    the disagreeing entries changes no bit of a sum that is used: `tests/test_merge.py` holds both forms
    to FusionBench's formula.
    """
    import torch

    positive = task_vectors[0].clamp(min=0)
    negative = task_vectors[0].clamp(max=0)
    scratch = torch.empty_like(positive)
    for row in task_vectors[1:]:
        positive += torch.clamp(row, min=0, out=scratch)
        negative += torch.clamp(row, max=0, out=scratch)
    return torch.where(total < 0, negative, positive), positive


def ties(
    base: Tensor,
    models: Sequence[Tensor],
    thresholds: Sequence[float],
    scaling_factor: float,
    merge_func: str,
) -> TiesChunk:
    """Trim each τᵢ to |τᵢ| >= thresholdsᵢ, elect sign(Σ trimmed τ), merge the agreeing entries."""
    import torch  # here, not at module level: `hubmerge validate` reads the registry without loading torch

    # In place, one (n, ...) buffer: trimming zeroes the entries below each model's cut-off.
    task_vectors = torch.empty((len(models), *base.shape), dtype=base.dtype, device=base.device)
    magnitude = torch.empty_like(base)
    for row, model, cut in zip(task_vectors, models, thresholds, strict=True):
        torch.sub(model, base, out=row)
        row.masked_fill_(torch.abs(row, out=magnitude) < cut, 0.0)
    total = task_vectors.sum(dim=0)
    # sign(total) summed, without materialising the sign: exact for any realistic model size.
    sign_sum = int(torch.count_nonzero(total > 0)) - int(torch.count_nonzero(total < 0))
    if merge_func == "sum":
        merged, positive = _elected_sum(task_vectors, total)
        # Σ trimmed τ is 0 while some τᵢ is not exactly where both signs occur, i.e. some τᵢ > 0.
        undecided = ((total == 0) & (positive > 0)).flatten().nonzero().flatten()
    else:
        sign = torch.sign(total)
        zero = sign == 0
        undecided = (zero & (task_vectors != 0).any(dim=0)).flatten().nonzero().flatten()
        merged = _disjoint_merge(task_vectors, torch.where(zero, 1.0, sign), merge_func)
    values = merged.mul_(scaling_factor).add_(base)  # base + λ·merged, rounded as written
    if undecided.numel():
        tv = task_vectors.flatten(1)[:, undecided]
        b = base.flatten()[undecided]
        ones = torch.ones_like(b)
        if_negative = b + scaling_factor * _disjoint_merge(tv, -ones, merge_func)
        if_zero = b + scaling_factor * _disjoint_merge(tv, 0 * ones, merge_func)
    else:
        if_negative = if_zero = base.new_empty(0)
    return TiesChunk(values, sign_sum, undecided, if_negative, if_zero)


# --- the registry --------------------------------------------------------------------------------------

_WEIGHT = Param("weight", float, 1.0, "this model's weight wᵢ")
_SCALING = Param(
    "scaling_factor", float, 0.3, "λ, the scale of the merged task vector (FusionBench default 0.3)"
)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "simple_average",
            "Simple average",
            "θ = (1/n) Σᵢ θᵢ",
            needs_base=False,
        ),
        Method(
            "linear",
            "Linear (weighted average)",
            "θ = Σᵢ wᵢ θᵢ / Σᵢ wᵢ",
            needs_base=False,
            model_params=(_WEIGHT,),
            paper="arXiv:2203.05482",
        ),
        Method(
            "task_arithmetic",
            "Task arithmetic",
            "θ = θ_base + λ Σᵢ wᵢ (θᵢ − θ_base)",
            needs_base=True,
            params=(_SCALING,),
            model_params=(_WEIGHT,),
            paper="arXiv:2212.04089",
        ),
        Method(
            "ties",
            "TIES merging",
            "θ = θ_base + λ · disjoint_merge(elect_sign(trim(θᵢ − θ_base, top threshold %)))",
            needs_base=True,
            params=(
                _SCALING,
                Param(
                    "threshold",
                    float,
                    20.0,
                    "percent of each task vector kept, by magnitude",
                    minimum=0.0,
                    maximum=100.0,
                ),
                Param(
                    "merge_func", str, "sum", "how agreeing entries combine", choices=("sum", "mean", "max")
                ),
                Param(
                    "trim",
                    str,
                    "global",
                    "rank magnitudes over the whole model or per tensor",
                    choices=("global", "tensor"),
                ),
            ),
            paper="arXiv:2306.01708",
            trims=True,
        ),
    )
}


def get_method(name: str) -> Method:
    return METHODS[name]
