"""Model breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795), as mergekit's `breadcrumbs`.

The generalized task arithmetic of `_gta.py` with the `magnitude_outliers` sparsifier and no consensus.
"""

from __future__ import annotations

from . import _gta

METHOD = _gta.method(
    name="breadcrumbs",
    title="Model breadcrumbs",
    formula="θ = θ_base + λ · Σᵢ wᵢ band_dᵢ,γᵢ(τᵢ) (/ Σᵢ wᵢ when normalize), τᵢ = θᵢ − θ_base",
    sparsifier="magnitude_outliers",
    consensus=False,
    normalize_default=False,
    rescale_default=False,
    paper="arXiv:2312.06795",
    citation=_gta.BREADCRUMBS,
    notes="mergekit's `breadcrumbs`: per tensor, τᵢ drops its int(γᵢN) largest magnitudes (`gamma`, default "
    "0.01) and its smallest, keeping int(dᵢN) entries (`density`, default 1: all). Entries tied in "
    "magnitude with either cut-off are all kept (mergekit keeps an unspecified subset). `rescale` is "
    "L1-norm matching as in mergekit.",
)
