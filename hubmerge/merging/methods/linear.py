"""Linear: the weighted average θ = Σᵢ wᵢ θᵢ / Σᵢ wᵢ (Wortsman et al. 2022, model soups), mergekit `linear`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..schedule import Setting, is_schedule
from .base import Citation, Contract, MergekitParams, Method, Param, Slice, Stats

if TYPE_CHECKING:
    from torch import Tensor

WEIGHT = Param("weight", float, 1.0, "this model's weight wᵢ", symbol="wᵢ")


def merge(s: Slice, stats: Stats) -> Tensor:
    import torch

    # mergekit's order of operations, so float32 results are bit-identical: weights in the compute dtype,
    # each term added with one fused multiply-add (addcmul), the sum of the weights taken in that dtype.
    weights = torch.tensor(s.weights(), dtype=s.dtype, device=s.models[0].device)
    total = torch.zeros_like(s.models[0])
    scratch = torch.empty_like(total)
    for m, w in zip(s.models, weights, strict=True):
        total.addcmul_(m if m.dtype == total.dtype else scratch.copy_(m), w)
    if s.params["normalize"]:
        total.div_(weights.sum())
    return total


def _weights_sum_to_zero(params: Mapping[str, Setting], models: Sequence[Mapping[str, Setting]]) -> str | None:
    """Dividing by Σ wᵢ = 0 would write a model of NaN and Inf (weights given per layer are not summed)."""
    weights = [m.get("weight", 1.0) for m in models]  # WEIGHT.default
    if not params.get("normalize", True) or any(is_schedule(w) for w in weights):
        return None
    values = [float(w) for w in weights]  # type: ignore[arg-type]
    if sum(values) != 0:
        return None
    return f"the weights sum to 0 ({' + '.join(map(str, values))}); linear divides by their sum"


METHOD = Method(
    name="linear",
    title="Linear (weighted average)",
    formula="θ = Σᵢ wᵢ θᵢ / Σᵢ wᵢ (without the division when normalize = false)",
    contract=Contract(base="ignored"),
    merge=merge,
    params=(Param("normalize", bool, True, "divide by Σᵢ wᵢ"),),
    model_params=(WEIGHT,),
    paper="arXiv:2203.05482",
    mergekit="linear",
    check_models=_weights_sum_to_zero,
    mergekit_params=MergekitParams(shared={"normalize": True}, per_model={"weight": None}),
    citation=Citation(
        "Wortsman et al. 2022",
        "Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing "
        "inference time",
        "Mitchell Wortsman and Gabriel Ilharco and Samir Yitzhak Gadre and Rebecca Roelofs and Raphael "
        "Gontijo-Lopes and Ari S. Morcos and Hongseok Namkoong and Ali Farhadi and Yair Carmon and Simon "
        "Kornblith and Ludwig Schmidt",
        2022,
        "wortsman2022modelsoups",
    ),
)
