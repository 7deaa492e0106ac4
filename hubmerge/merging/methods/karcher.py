"""Karcher mean: the Riemannian (Fréchet) mean of the models' directions on the sphere, mergekit `karcher`.

mergekit's algorithm, per tensor, on the models θ₁ … θₙ with equal weights αᵢ = 1/n, nᵢ = ‖θᵢ‖:
the unit directions uᵢ = θᵢ / nᵢ of the inputs with nᵢ > tol (the "valid" ones, weights α renormalised
over them to βᵢ); the start m = Σ βᵢ uᵢ normalised (u of the first valid input if its norm is < tol); then
at most `max_iter` times

    T = Σ βᵢ · Ωᵢ / sin Ωᵢ · (uᵢ − cos Ωᵢ · m),   cos Ωᵢ = clamp(⟨m, uᵢ⟩, −1, 1), skipping Ωᵢ < tol
    stop if ‖T‖ < tol;  m ← cos‖T‖ · m + sin‖T‖ · T/‖T‖;  m ← m/‖m‖ (if ‖m‖ > tol)

and the result is (Σ αᵢ nᵢ) · m. One input is returned as is; all norms ≤ tol give zeros.

**Why it runs on an n×n matrix.** m starts in the span of the uᵢ, and every update is a linear combination
of m and the uᵢ, so m = Σ cᵢ uᵢ throughout. With the Gram matrix of the directions U = (⟨uᵢ, uⱼ⟩) =
(Gᵢⱼ / (nᵢ nⱼ)), where G = (⟨θᵢ, θⱼ⟩) comes from one streaming pass (`sphere.py`):

    ⟨m, uᵢ⟩ = (U c)ᵢ,   T = Σ tᵢ uᵢ with tᵢ = βᵢ Ωᵢ/sin Ωᵢ − (Σⱼ βⱼ Ωⱼ/sin Ωⱼ cos Ωⱼ) cᵢ,
    ‖T‖ = √(tᵀ U t),   m ← cos‖T‖ c + sin‖T‖/‖T‖ t,   ‖m‖ = √(cᵀ U c),

so the whole iteration runs in float64 on n numbers, and one elementwise pass writes
Σ ((Σ αⱼ nⱼ) cᵢ / nᵢ) θᵢ. mergekit iterates on float32 tensors, rounding every intermediate; its output
and this one differ by that rounding.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .base import Contract, MergekitParams, Method, Param, Slice, Stats
from .sphere import gram_pass, task_vectors

if TYPE_CHECKING:
    from torch import Tensor


def coefficients(g: Tensor, max_iter: int, tol: float) -> Tensor:
    """k with Σ kᵢ θᵢ the Karcher mean, from the float64 Gram matrix `g` of the n inputs."""
    import torch

    g = g.cpu()
    n = g.shape[0]
    norms = g.diagonal().sqrt()
    valid = [i for i in range(n) if norms[i] > tol]
    k = torch.zeros(n, dtype=torch.float64)
    if not valid:
        return k  # mergekit: zeros
    nv = norms[valid]
    u = g[valid][:, valid] / torch.outer(nv, nv)  # ⟨uᵢ, uⱼ⟩ over the valid inputs
    beta = torch.full((len(valid),), 1.0 / len(valid), dtype=torch.float64)

    def norm(c: Tensor) -> float:
        return math.sqrt(max(float(c @ u @ c), 0.0))

    c = beta.clone()
    mean_norm = norm(c)
    if mean_norm < tol:
        c = torch.zeros_like(beta)
        c[0] = 1.0
    else:
        c /= mean_norm
    for _ in range(max_iter):
        cos = (u @ c).clamp(-1.0, 1.0)
        omega = torch.arccos(cos)
        step = torch.where(omega < tol, 0.0, beta * omega / torch.sin(omega))
        tangent = step - float(step @ cos) * c
        tangent_norm = norm(tangent)
        if tangent_norm < tol:
            break
        c = math.cos(tangent_norm) * c + (math.sin(tangent_norm) / tangent_norm) * tangent
        unit_norm = norm(c)
        if unit_norm > tol:
            c /= unit_norm
    scale = float(norms.sum()) / n  # Σ αᵢ nᵢ over every input, valid or not
    k[valid] = scale * c / nv
    return k


def merge(s: Slice, stats: Stats) -> Tensor:
    import torch

    if len(s.models) == 1:
        return s.upcast(s.models[0])
    k = coefficients(stats["gram"], int(s.params["max_iter"]), float(s.params["tol"])).tolist()
    x = task_vectors(s)
    out = torch.mul(x[0], k[0])
    for xi, ki in zip(x[1:], k[1:], strict=True):
        out.add_(xi, alpha=ki)
    return out


METHOD = Method(
    name="karcher",
    title="Karcher mean (Riemannian mean on the sphere)",
    formula="θ = (1/n Σᵢ ‖θᵢ‖) · argmin_{‖m‖=1} Σᵢ arccos²⟨m, θᵢ/‖θᵢ‖⟩",
    contract=Contract(base="ignored", min_models=1),
    merge=merge,
    params=(
        Param("max_iter", int, 10, "iterations at most", minimum=0),
        Param("tol", float, 1e-5, "stop when the tangent step is shorter than this", minimum=0.0),
    ),
    passes=(gram_pass("gram", task_vectors),),
    paper="arXiv:2603.04972",
    mergekit="karcher",
    mergekit_params=MergekitParams(shared={"max_iter": 10, "tol": 1e-5}),
    notes="Equal weights; the base is not an input (mergekit adds a `base_model` to the inputs: list it among "
    "the models to get the same merge). The iteration runs in float64 on the n×n Gram matrix of the models, "
    "summed slice by slice; mergekit iterates on float32 tensors, rounding every iterate. Measured at most 5 "
    "ulp of a tensor's largest value from mergekit's float32 outputs (hubmerge 1.1 ulp from a float64 "
    "computation, mergekit 4.2); tested: within 1e-6 × the tensor's largest value (float32), 1 ulp (bf16).",
)
