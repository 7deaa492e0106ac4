"""Task arithmetic: θ = θ_base + λ Σᵢ wᵢ τᵢ (Ilharco et al. 2023), FusionBench's `TaskArithmeticAlgorithm`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Citation, Contract, FusionBenchConfig, Method, Param, Slice, Stats
from .linear import WEIGHT

if TYPE_CHECKING:
    from torch import Tensor

SCALING = Param(
    "scaling_factor",
    float,
    0.3,
    "λ, the scale of the merged task vector (FusionBench default 0.3)",
    symbol="λ",
)


def merge(s: Slice, stats: Stats) -> Tensor:
    import torch

    assert s.base is not None
    base, weights = s.base, s.weights()
    # Deltas accumulate one after another, then scale, then add: FusionBench's order of operations.
    task_vector = s.models[0] - base
    if weights[0] != 1.0:
        task_vector.mul_(weights[0])
    scratch = torch.empty_like(task_vector)
    for m, w in zip(s.models[1:], weights[1:], strict=True):
        torch.sub(m, base, out=scratch)
        task_vector += scratch.mul_(w) if w != 1.0 else scratch
    return task_vector.mul_(float(s.params["scaling_factor"])).add_(base)  # base + λ·τ, rounded as written


METHOD = Method(
    name="task_arithmetic",
    title="Task arithmetic",
    formula="θ = θ_base + λ Σᵢ wᵢ (θᵢ − θ_base)",
    contract=Contract(base="required"),
    merge=merge,
    params=(SCALING,),
    model_params=(WEIGHT,),
    paper="arXiv:2212.04089",
    mergekit="task_arithmetic",
    fusionbench="TaskArithmeticAlgorithm",
    citation=Citation(
        "Ilharco et al. 2023",
        "Editing Models with Task Arithmetic",
        "Gabriel Ilharco and Marco Tulio Ribeiro and Mitchell Wortsman and Suchin Gururangan and Ludwig "
        "Schmidt and Hannaneh Hajishirzi and Ali Farhadi",
        2023,
        "ilharco2023editing",
    ),
    fusionbench_config=FusionBenchConfig(
        "linear/task_arithmetic_for_causallm",
        {"scaling_factor": 0.8, "weight": 1.0},
        overrides=("scaling_factor",),
    ),
    notes="λ is `scaling_factor` (mergekit calls it `lambda`, default 1.0; FusionBench's default is 0.3).",
)
