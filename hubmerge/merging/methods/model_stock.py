"""Model Stock (Jang et al. 2024): interpolate from the base toward the average by the task vectors' angle.

With τᵢ = θᵢ − θ_base for n ≥ 2 models, cos φ = the mean over pairs i < j of
clamp(⟨τᵢ, τⱼ⟩ / max(‖τᵢ‖ ‖τⱼ‖, 1e-6), −1, 1), over the whole tensor (or per row with `filter_wise`):

    t = n cos φ / (1 + (n − 1) cos φ)   (t = 0 where |1 + (n − 1) cos φ| < 1e-6)
    θ = t · (Σᵢ θᵢ)/n + (1 − t) · θ_base

as mergekit 0.1.5 computes it. The pairwise inner products come from one streaming pass in float64
(`sphere.py`; per row, the slice itself); the cosines are rounded to float32 and t and the elementwise
step follow mergekit's float32 arithmetic, so outputs differ from mergekit's only through t.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .base import Contract, MergekitParams, Method, Param, Slice, Stats
from .sphere import gram_pass, local_gram, one_vector, task_vectors

if TYPE_CHECKING:
    from torch import Tensor


def interpolation_t(g: Tensor, dtype: Any) -> Tensor:
    """t in the compute `dtype`, one per Gram matrix in `g` (k, n, n) of the task vectors (on the CPU, so
    every device gets the same t)."""
    import torch

    g = g.cpu()
    n = g.shape[-1]
    norms = g.diagonal(dim1=1, dim2=2).sqrt()
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = torch.stack(
        [(g[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=1e-6)).to(dtype).clamp(-1, 1) for i, j in pairs]
    ).mean(dim=0)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, 0.0, (n * cos) / torch.where(singular, 1.0, denominator))


def merge(s: Slice, stats: Stats) -> Tensor:
    assert s.base is not None
    if s.params["filter_wise"]:
        t = interpolation_t(local_gram(s, stats, "gram", task_vectors(s)), s.dtype).view(-1, 1)
        view = (1, -1) if one_vector(s.shape) else (-1, s.shape[-1])
    else:
        t = interpolation_t(stats["gram"].view(1, len(s.models), len(s.models)), s.dtype)
        view = (1, -1)
    average = s.models[0].to(s.dtype, copy=True)
    for m in s.models[1:]:
        average += m
    average /= len(s.models)
    t = t.to(s.base.device)
    out = (t * average.view(view)).add_((1 - t) * s.base.view(view))
    return out.view(s.base.shape)


def _whole(params: Mapping[str, Any], models: object = ()) -> bool:
    return not params["filter_wise"]


def _rows(params: Mapping[str, Any], models: object = ()) -> bool:
    return bool(params["filter_wise"])


METHOD = Method(
    name="model_stock",
    title="Model Stock",
    formula="θ = t · (1/n) Σᵢ θᵢ + (1 − t) · θ_base, t = n cos φ / (1 + (n − 1) cos φ), "
    "cos φ = mean over i < j of cos(θᵢ − θ_base, θⱼ − θ_base)",
    contract=Contract(base="required", min_models=2),
    merge=merge,
    params=(
        Param(
            "filter_wise",
            bool,
            False,
            "one ratio t per row (filter) instead of one per tensor",
            per_tensor=False,
        ),
    ),
    passes=(
        gram_pass("gram", task_vectors, when=_whole),
        gram_pass("gram", task_vectors, when=_rows, shapes=one_vector),
    ),
    paper="arXiv:2403.19522",
    mergekit="model_stock",
    mergekit_params=MergekitParams(shared={"filter_wise": False}),
    notes="Needs at least two fine-tunes of the base (mergekit: three inputs with the base). The pairwise inner "
    "products are summed in float64 slice by slice instead of float32 over the whole tensor, so t can differ "
    "from mergekit's in its last bits: measured at most 3 ulp of a tensor's largest value from mergekit's "
    "float32 outputs; tested: within 1e-6 × the tensor's largest value (float32), 1 ulp (bf16).",
)
