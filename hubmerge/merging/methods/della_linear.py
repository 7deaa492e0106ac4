"""DELLA's MagPrune (Deep et al. 2024, arXiv:2406.11617) with a plain weighted sum, as mergekit's `della_linear`.

The generalized task arithmetic of `_gta.py` with the `della_magprune` sparsifier and no consensus.
"""

from __future__ import annotations

from . import _gta

METHOD = _gta.method(
    name="della_linear",
    title="DELLA (linear)",
    formula="θ = θ_base + λ · Σᵢ wᵢ rescale(magprune_dᵢ,εᵢ(τᵢ)) (/ Σᵢ wᵢ when normalize), τᵢ = θᵢ − θ_base",
    sparsifier="della_magprune",
    consensus=False,
    normalize_default=False,
    rescale_default=True,
    paper="arXiv:2406.11617",
    citation=_gta.DELLA,
    notes="mergekit's `della_linear`: in each row, an entry of τᵢ is kept with probability "
    "(dᵢ − εᵢ) + 2εᵢ·rank/(C − 1) by its magnitude rank (`density` dᵢ, default 1: all; `epsilon` εᵢ, default "
    "0.15; dᵢ ± εᵢ must lie in (0, 1)); a 1-D tensor is one row. The mask comes from `seed`, the tensor and "
    "the position only, never equal to mergekit's torch.bernoulli draws; equal magnitudes rank in position "
    "order. `rescale` (default true) is mergekit's L1-norm matching over the tensor, not the paper's 1/p.",
)
