"""Model breadcrumbs (arXiv:2312.06795) with TIES sign election, as mergekit's `breadcrumbs_ties`.

The generalized task arithmetic of `_gta.py` with the `magnitude_outliers` sparsifier and the `sum` consensus.
"""

from __future__ import annotations

from . import _gta

METHOD = _gta.method(
    name="breadcrumbs_ties",
    title="Model breadcrumbs with TIES",
    formula="θ = θ_base + λ · Σᵢ [sign(wᵢτᵢ) = elected sign] wᵢ band_dᵢ,γᵢ(τᵢ) (/ Σᵢ [agrees] wᵢ when normalize)",
    sparsifier="magnitude_outliers",
    consensus=True,
    normalize_default=False,
    rescale_default=False,
    paper="arXiv:2312.06795",
    citation=_gta.BREADCRUMBS,
    notes="mergekit's `breadcrumbs_ties`: per tensor, τᵢ drops its int(γᵢN) largest magnitudes (`gamma`, "
    "default 0.01) and its smallest, keeping int(dᵢN) entries (`density`, default 1: all), then TIES's sign "
    "election. Entries tied in magnitude with either cut-off are all kept (mergekit keeps an unspecified "
    "subset). `rescale` is L1-norm matching as in mergekit.",
)
