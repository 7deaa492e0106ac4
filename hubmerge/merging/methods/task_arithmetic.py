"""Task arithmetic: θ = θ_base + λ Σᵢ wᵢ τᵢ (Ilharco et al. 2023), FusionBench's `TaskArithmeticAlgorithm`.

With mergekit's extras set (`density` below 1, `normalize`), a tensor goes through mergekit's generalized
task arithmetic (`_gta.py`, no consensus, magnitude sparsifier) instead, with λ = `scaling_factor`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import _gta
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

_MERGEKIT_MERGE = _gta.gta_merge("magnitude", consensus=False, scale="scaling_factor")


def merge(s: Slice, stats: Stats) -> Tensor:
    import torch

    if s.params["normalize"] or any(_gta.sparsifies(float(p["density"])) for p in s.model_params):
        return _MERGEKIT_MERGE(s, stats)
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
    formula="θ = θ_base + λ Σᵢ wᵢ top_dᵢ(θᵢ − θ_base) (/ Σᵢ wᵢ when normalize)",
    contract=Contract(base="required"),
    merge=merge,
    params=(SCALING, _gta.normalize(False), _gta.rescale(False)),
    model_params=(WEIGHT, _gta.DENSITY),
    passes=_gta.passes("magnitude"),
    paper="arXiv:2212.04089",
    mergekit="task_arithmetic",
    mergekit_params=_gta.mergekit_params(normalize=False, rescale=False, renamed={"lambda": "scaling_factor"}),
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
    notes="λ is `scaling_factor` (mergekit calls it `lambda`, default 1.0; FusionBench's default is 0.3). "
    "mergekit's extras: `density` (default 1: off) keeps each tensor's int(dᵢ·N) largest |τᵢ| per model, "
    "entries tied with the cut-off all kept; `normalize` (default false) divides by Σᵢ wᵢ; `rescale` "
    "(default false) is mergekit's L1-norm matching of each trimmed τᵢ. Unset, the result is "
    f"FusionBench's bit for bit. {_gta.reads_note('magnitude')}",
)
