"""mergekit's TIES (Yadav et al. 2023, arXiv:2306.01708): per-tensor magnitude trim, weights, sign election.

The generalized task arithmetic of `_gta.py` with the `magnitude` sparsifier and the `sum` consensus.
hubmerge's `ties` is FusionBench's TIES (one cut over the whole model, no weights): a different method.
"""

from __future__ import annotations

from . import _gta

METHOD = _gta.method(
    name="mergekit_ties",
    title="TIES merging (mergekit)",
    formula="θ = θ_base + λ · Σᵢ [sign(wᵢτᵢ) = elected sign] wᵢ top_dᵢ(τᵢ) / Σᵢ [agrees] wᵢ, τᵢ = θᵢ − θ_base",
    sparsifier="magnitude",
    consensus=True,
    normalize_default=True,
    rescale_default=False,
    paper="arXiv:2306.01708",
    citation=_gta.TIES,
    notes="mergekit's `ties`: each tensor keeps the int(dᵢ·N) largest |τᵢ| of each model (`density`, default 1: "
    "no trim), per-model `weight`, the division by the agreeing weights when `normalize` (default true), "
    "λ = `lambda` (default 1). hubmerge's `ties` is FusionBench's TIES (one cut over the whole model, "
    "`scaling_factor`, no weights). Entries tied in magnitude with the cut-off are all kept (mergekit keeps "
    "an unspecified k of them). `rescale` is L1-norm matching as in mergekit.",
)
