"""SLERP: spherical interpolation between the base and one model, per tensor (Shoemake 1985), mergekit `slerp`.

With cos Ω = ⟨θ_base, θ₁⟩ / (‖θ_base‖ ‖θ₁‖) over the whole flattened tensor (a norm of at most 1e-8 counts
as 1), θ = sin((1−t)Ω)/sin Ω · θ_base + sin(tΩ)/sin Ω · θ₁ on the unnormalised tensors; where
|cos Ω| > 0.9995 (nearly parallel, or antiparallel), the plain lerp (1−t)·θ_base + t·θ₁.

The inner products come from one streaming pass (`sphere.py`); the coefficients are then computed as
mergekit 0.1.5 computes them (float32 scalar arithmetic: acos, sin, the threshold) and the elementwise
step is mergekit's, so the output differs from mergekit's only where cos Ω, rounded to float32, differs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Contract, MergekitParams, Method, Param, Slice, Stats
from .sphere import gram_pass

if TYPE_CHECKING:
    from torch import Tensor

DOT_THRESHOLD = 0.9995  # |cos Ω| above this: lerp (mergekit's `dot_threshold`)
EPS = 1e-8  # a norm at most this counts as 1 (mergekit's `eps`)


def _inputs(s: Slice) -> list[Tensor]:
    assert s.base is not None
    return [s.base, s.upcast(s.models[0])]


def coefficients(t: float, g: Tensor, dtype: Any) -> tuple[float, float]:
    """(c_base, c_model) for interpolation weight `t` and the float64 Gram matrix `g` of (θ_base, θ₁), in
    the compute `dtype` (on the CPU, so every device gets the same coefficients)."""
    import torch

    g = g.cpu()
    norms = g.diagonal().sqrt()
    norms = torch.where(norms > EPS, norms, 1.0)
    # mergekit sums ⟨θ_base/‖θ_base‖, θ₁/‖θ₁‖⟩ in float32; this is the same quantity, rounded once.
    dot = (g[0, 1] / (norms[0] * norms[1])).to(dtype).clamp(-1, 1)
    t32 = torch.tensor(t, dtype=dtype)
    linear = dot.abs() > DOT_THRESHOLD
    omega = torch.acos(torch.where(linear, 0.0, dot))
    sin_omega = torch.sin(omega)
    c_base = torch.where(linear, 1 - t32, torch.sin((1 - t32) * omega) / sin_omega)
    c_model = torch.where(linear, t32, torch.sin(t32 * omega) / sin_omega)
    return float(c_base), float(c_model)


def merge(s: Slice, stats: Stats) -> Tensor:
    import torch

    assert s.base is not None
    c_base, c_model = coefficients(float(s.params["t"]), stats["gram"], s.dtype)
    # c_base·θ_base + c_model·θ₁, each product rounded in float32: mergekit's elementwise step.
    return torch.mul(s.base, c_base).add_(s.models[0].to(s.dtype, copy=True).mul_(c_model))


METHOD = Method(
    name="slerp",
    title="SLERP (spherical linear interpolation)",
    formula="θ = sin((1−t)Ω)/sin Ω · θ_base + sin(tΩ)/sin Ω · θ₁, cos Ω = ⟨θ_base, θ₁⟩ / (‖θ_base‖ ‖θ₁‖)",
    contract=Contract(base="required", min_models=1, max_models=1),
    merge=merge,
    params=(Param("t", float, None, "interpolation weight: 0 gives the base, 1 the model"),),
    passes=(gram_pass("gram", _inputs),),
    mergekit="slerp",
    mergekit_params=MergekitParams(shared={"t": None}),
    notes="Interpolates between `base` and the one model (mergekit: `base_model` and the other input). The "
    "angle is taken over the whole tensor; |cos Ω| > 0.9995 falls back to the lerp, as in mergekit. The dot "
    "product is summed in float64 slice by slice, not in float32 over the whole tensor as mergekit does, so "
    "the coefficients can differ from mergekit's in their last bits: measured at most 3 ulp of a tensor's "
    "largest value in float32 outputs, and 1 element in 36256 off by 1 ulp in bf16; tested: float32 within "
    "1e-6 × the tensor's largest value, bf16 within 1 ulp.",
)
