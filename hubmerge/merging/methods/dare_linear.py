"""DARE (Yu et al. 2023, arXiv:2311.03099) with a plain weighted sum, as mergekit's `dare_linear`.

The generalized task arithmetic of `_gta.py` with the `random` sparsifier and no consensus.
"""

from __future__ import annotations

from . import _gta

METHOD = _gta.method(
    name="dare_linear",
    title="DARE (linear)",
    formula="θ = θ_base + λ · Σᵢ wᵢ rescale(drop_dᵢ(τᵢ)) (/ Σᵢ wᵢ when normalize), τᵢ = θᵢ − θ_base",
    sparsifier="random",
    consensus=False,
    normalize_default=False,
    rescale_default=True,
    paper="arXiv:2311.03099",
    citation=_gta.DARE,
    notes="mergekit's `dare_linear`: each entry of τᵢ is kept with probability `density` dᵢ (default 1: all), "
    "by a mask from `seed`, the tensor and the position only (reproducible across slice sizes and devices, "
    "never equal to mergekit's torch.bernoulli draws). `rescale` (default true) is mergekit's L1-norm "
    "matching, ‖τᵢ‖₁ / ‖kept τᵢ‖₁ per tensor, not the paper's 1/dᵢ.",
)
