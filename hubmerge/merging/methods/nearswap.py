"""NearSwap: keep the model's value where it is within t of the base's, move towards the base elsewhere.

mergekit's `nearswap` (Alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001), per
element: w = clamp(t / max(|θ_base − θ₁|, 10⁻⁶), 0, 1), θ = w·θ₁ + (1 − w)·θ_base. Elementwise, one read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Contract, MergekitParams, Method, Param, Slice, Stats

if TYPE_CHECKING:
    from torch import Tensor


def merge(s: Slice, stats: Stats) -> Tensor:
    assert s.base is not None
    base, model = s.base, s.models[0]
    # mergekit's expressions as written: t / x is torch's reciprocal(x) · t, 1 − w its rsub.
    weight = (float(s.params["t"]) / (base - model).abs_().clamp_(min=1e-6)).clamp_(min=0, max=1)
    return weight * model + (1 - weight) * base


METHOD = Method(
    name="nearswap",
    title="NearSwap",
    formula="θ = w ⊙ θ₁ + (1 − w) ⊙ θ_base, w = clamp(t / max(|θ_base − θ₁|, 10⁻⁶), 0, 1)",
    contract=Contract(base="required", min_models=1, max_models=1),
    merge=merge,
    params=(
        Param(
            "t",
            float,
            None,
            "distance to the base within which the model's value is kept whole; farther ones move towards the base",
            minimum=0.0,
            symbol="t",
        ),
    ),
    mergekit="nearswap",
    mergekit_params=MergekitParams(shared={"t": None}),
    symbols=(("θ₁", "the parameters of the model"), ("w", "the model's per-element weight")),
    notes="No paper: the method comes from Alchemonaut's model card "
    "(https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001), as mergekit cites it.",
)
