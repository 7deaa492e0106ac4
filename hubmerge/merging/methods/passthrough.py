"""Passthrough: one model's tensors, each optionally scaled, mergekit's `passthrough` (θ = s · θ₁)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Contract, MergekitParams, Method, Param, Slice, Stats

if TYPE_CHECKING:
    from torch import Tensor


def merge(s: Slice, stats: Stats) -> Tensor:
    scale = s.weights("scale")[0]
    model = s.models[0]  # the compute dtype: the first input of a method without a base
    return model.clone() if scale == 1.0 else model * scale


METHOD = Method(
    name="passthrough",
    title="Passthrough",
    formula="θ = sᵢ θᵢ (one model)",
    contract=Contract(base="ignored", min_models=1, max_models=1),
    merge=merge,
    model_params=(
        Param(
            "scale",
            float,
            1.0,
            "factor on this model's tensors (with filters: attenuate some, e.g. o_proj and down_proj)",
            symbol="sᵢ",
        ),
    ),
    mergekit="passthrough",
    mergekit_params=MergekitParams(per_model={"scale": 1.0}),  # mergekit: None, the tensor as it is
    notes="mergekit's `scale` is unset by default (no multiplication); 1.0 here gives the same tensors.",
)
