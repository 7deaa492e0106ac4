"""Simple average: θ = (1/n) Σᵢ θᵢ, FusionBench's `SimpleAverageAlgorithm` (the base takes no part)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Contract, FusionBenchConfig, Method, Slice, Stats

if TYPE_CHECKING:
    from torch import Tensor


def merge(s: Slice, stats: Stats) -> Tensor:
    # Sum in order, divide once: FusionBench's state_dict_add / state_dict_div.
    total = s.models[0].clone()
    for m in s.models[1:]:
        total += m
    return total.div_(len(s.models))


METHOD = Method(
    name="simple_average",
    title="Simple average",
    formula="θ = (1/n) Σᵢ θᵢ",
    contract=Contract(base="ignored"),
    merge=merge,
    fusionbench="SimpleAverageAlgorithm",
    fusionbench_config=FusionBenchConfig(
        "linear/simple_average_for_causallm", config_json="Qwen/Qwen2.5-Math-1.5B"
    ),
    notes="The base, when given, only provides config.json (as in FusionBench).",
)
