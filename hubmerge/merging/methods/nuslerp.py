"""NuSLERP: spherical interpolation of two models, or of their task vectors around a base, mergekit `nuslerp`.

t = w₂ / (w₁ + w₂) (0.5 when |w₁ + w₂| < 1e-6). With a base, vᵢ = τᵢ = θᵢ − θ_base and the result is
θ_base + slerp(t, v₁, v₂); without, vᵢ = θᵢ and the result is slerp(t, v₁, v₂), where

    slerp(t, v₁, v₂) = (sin((1−t)Ω) v₁ + sin(tΩ) v₂) / sin Ω,   cos Ω = ⟨v₁, v₂⟩ / (max(‖v₁‖, 1e-7) max(‖v₂‖, 1e-7))

and (1−t) v₁ + t v₂ where 1 − cos²Ω ≤ 1e-16 (collinear). The angle is taken over the whole flattened
tensor (`nuslerp_flatten = true`, the default), or per vector along the last dimension (`false`: the rows
of a matrix), or per vector along the first dimension (`nuslerp_flatten = false, nuslerp_row_wise = true`:
the columns of a matrix, mergekit's naming). A 1-D tensor is one vector in every mode.

Slices hold whole rows, so the per-row angles come from the slice itself; the whole-tensor and per-column
inner products come from one streaming pass in float64 (`sphere.py`). The scalar arithmetic after them
(clamp, acos, sin, the collinearity test) is mergekit's, in float32, and so is the elementwise step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .base import Contract, MergekitParams, Method, Param, Slice, Stats
from .sphere import gram, gram_pass, one_vector, task_vectors

if TYPE_CHECKING:
    from torch import Tensor

WEIGHT = Param("weight", float, None, "this model's weight wᵢ (t = w₂ / (w₁ + w₂))")
NORM_EPS = 1e-7  # a norm below this is taken as this (mergekit's `_normalize`)
COLLINEAR_EPS = 1e-8  # collinear where 1 − cos² ≤ this² (mergekit's `eps`)


def interpolation_t(weights: list[float]) -> float:
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def slerp_coefficients(t: float, g: Tensor, dtype: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(sin((1−t)Ω), sin(tΩ), sin Ω, collinear) in the compute `dtype`, one per vector, from float64 Gram
    matrices `g` of shape (k, 2, 2). On the CPU, so every device gets the same coefficients."""
    import torch

    g = g.cpu()
    norms = g.diagonal(dim1=1, dim2=2).sqrt().clamp(min=NORM_EPS)
    cos = (g[:, 0, 1] / (norms[:, 0] * norms[:, 1])).to(dtype).clamp(-1, 1)
    collinear = (1 - cos.square()) <= COLLINEAR_EPS**2
    omega = torch.acos(torch.where(collinear, 0.0, cos))
    return torch.sin((1 - t) * omega), torch.sin(t * omega), torch.sin(omega), collinear


def slerp(t: float, v: list[Tensor], g: Tensor, view: tuple[int, int], per: str) -> Tensor:
    """mergekit's elementwise step on `v` seen as `view` (rows, columns), with one angle for the whole
    slice (`per="tensor"`), per row or per column."""
    import torch

    a, b, sin_omega, collinear = slerp_coefficients(t, g, v[0].dtype)
    any_collinear = bool(collinear.any())
    shape = {"tensor": (1, 1), "row": (-1, 1), "column": (1, -1)}[per]
    a, b, sin_omega, collinear = (x.view(shape).to(v[0].device) for x in (a, b, sin_omega, collinear))
    v1, v2 = (x.reshape(view) for x in v)
    result = (a * v1).add_(b * v2).div_(sin_omega)
    return torch.where(collinear, (1 - t) * v1 + t * v2, result) if any_collinear else result


def _flat(params: Mapping[str, Any], models: object = ()) -> bool:
    return bool(params["nuslerp_flatten"])


def _columns(params: Mapping[str, Any], models: object = ()) -> bool:
    return not params["nuslerp_flatten"] and bool(params["nuslerp_row_wise"])


def _rows(params: Mapping[str, Any], models: object = ()) -> bool:
    return not params["nuslerp_flatten"] and not params["nuslerp_row_wise"]


def merge(s: Slice, stats: Stats) -> Tensor:
    t = interpolation_t(s.weights())
    v = task_vectors(s)
    if s.params["nuslerp_flatten"] or one_vector(s.shape):
        out = slerp(t, v, stats["gram"].view(1, 2, 2), (1, -1), "tensor")
    elif s.params["nuslerp_row_wise"]:
        out = slerp(t, v, stats["gram"], (-1, s.row_size), "column")
    else:
        out = slerp(t, v, gram(v, s.shape, "vector"), (-1, s.shape[-1]), "row")
    out = out.view(v[0].shape)
    return out if s.base is None else out.add_(s.base)


METHOD = Method(
    name="nuslerp",
    title="NuSLERP (weighted spherical interpolation of two models)",
    formula="θ = θ_base + (sin((1−t)Ω) τ₁ + sin(tΩ) τ₂) / sin Ω, t = w₂/(w₁+w₂), cos Ω = ⟨τ₁, τ₂⟩/(‖τ₁‖ ‖τ₂‖), "
    "τᵢ = θᵢ − θ_base (θᵢ without a base)",
    contract=Contract(base="optional", min_models=2, max_models=2),
    merge=merge,
    params=(
        Param(
            "nuslerp_flatten",
            bool,
            True,
            "one angle for the whole tensor (false: one per row, or per column with nuslerp_row_wise)",
            per_tensor=False,
        ),
        Param(
            "nuslerp_row_wise",
            bool,
            False,
            "with nuslerp_flatten = false: one angle per column vector (mergekit's name)",
            per_tensor=False,
        ),
    ),
    model_params=(WEIGHT,),
    passes=(
        gram_pass("gram", task_vectors, when=_flat),
        gram_pass("gram", task_vectors, "column", when=_columns),
        gram_pass("gram", task_vectors, when=_rows, shapes=one_vector),
    ),
    mergekit="nuslerp",
    mergekit_params=MergekitParams(
        shared={"nuslerp_row_wise": False, "nuslerp_flatten": True}, per_model={"weight": None}
    ),
    notes="Without a base it interpolates the models themselves, with one the task vectors. mergekit names the "
    "per-column mode `nuslerp_row_wise`. Inner products are summed in float64 slice by slice, not in float32 "
    "over the whole tensor as mergekit does: measured at most 1.5 ulp of a tensor's largest value from "
    "mergekit's float32 outputs; tested: within 1e-6 × the tensor's largest value (float32), 1 ulp (bf16). "
    "mergekit with `dtype: bfloat16` computes nuslerp in bf16; hubmerge computes in float32 and rounds once.",
)
