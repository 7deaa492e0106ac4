"""Generalized task arithmetic: what mergekit's `GeneralizedTaskArithmeticMerge` methods share.

mergekit 0.1.5 runs task arithmetic, TIES, DARE, breadcrumbs and DELLA as one algorithm with two knobs, a
sparsifier and a consensus rule (`merge_methods/generalized_task_arithmetic.py`, `sparsify.py`). Per
tensor, with τᵢ = θᵢ − θ_base:

1. **sparsify** each τᵢ to its density dᵢ (dᵢ >= 1 leaves τᵢ as it is, unscaled):
   - `magnitude` (TIES): keep the k = max(1, int(dᵢ·N)) entries of largest |τᵢ| in the tensor;
   - `random` (DARE): keep each entry with probability dᵢ;
   - `magnitude_outliers` (breadcrumbs): in ascending |τᵢ| order keep ranks [n_bot, n_bot + int(dᵢN)),
     n_bot = max(0, N − int(dᵢN) − int(γᵢN)): the smallest and the γᵢ largest go;
   - `della_magprune` (DELLA): within each row (a 1-D tensor is one row), keep an entry with probability
     (dᵢ − εᵢ) + 2εᵢ · rank/(C − 1), rank its 0-based place in ascending |τᵢ| order over the row's C entries;
2. **rescale** (`rescale = true`): multiply the kept τᵢ by ‖τᵢ‖₁ / ‖kept τᵢ‖₁ over the whole tensor
   (unless either is below 1e-7). This is mergekit's L1-norm matching, **not** DARE's 1/dᵢ;
3. **weight**: τᵢ ← wᵢ·τᵢ;
4. **consensus** `sum` (TIES's sign election): elected sign + where Σᵢ wᵢτᵢ >= 0, else −; entry i
   counts where sign(wᵢτᵢ) is the elected sign (zeros never do); mixed = Σ counted wᵢτᵢ, divisor = Σ
   counted wᵢ (0 → 1). Without consensus: mixed = Σ wᵢτᵢ, divisor = Σ wᵢ (|Σ wᵢ| < 1e-8 → 1);
5. θ = θ_base + λ · mixed (/ divisor when `normalize`).

The steps run in mergekit's order of float32 operations, so a merge without rescale is bit-identical to
mergekit's run with `dtype: float32`. The whole-tensor quantities come from passes before the merge: a
`Select` for the magnitude cut-offs (exact k-th values, `selection.py`), a `Reduce` for the L1 norms of
rescale (summed in float64 slice by slice: mergekit's float32 sum rounds differently, so the rescale
factor can differ from mergekit's in its last bits).

Ties at a magnitude cut-off: mergekit's `argsort` is not stable, so of several entries whose |τᵢ| equals
the cut-off it keeps an unspecified subset (exactly k in all). hubmerge keeps every entry at or beyond
each cut-off (|τᵢ| >= the k-th largest; for breadcrumbs lo <= |τᵢ| <= hi), possibly more than k; with
distinct magnitudes the two agree.

Random masks come from `base.uniform` (a function of the recipe's `seed`, the tensor name, the model
index and the position only): entry kept where u < p. They never match mergekit's `torch.bernoulli`
draws, only their distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..schedule import Setting, scalars
from .base import Citation, Contract, MergekitParams, Method, Param, Reduce, Select, Slice, Stats, uniform
from .base import Pass as _Pass
from .linear import WEIGHT

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "DENSITY",
    "EPSILON",
    "GAMMA",
    "LAMBDA",
    "SEED",
    "Sparsifier",
    "gta_merge",
    "method",
    "normalize",
    "passes",
    "reads_note",
    "rescale",
    "sparsifies",
]

Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]

DENSITY = Param(
    "density",
    float,
    1.0,
    "dᵢ, the fraction of this model's task vector kept in each tensor (1: all of it)",
    minimum=0.0,
    maximum=1.0,
)
LAMBDA = Param("lambda", float, 1.0, "λ, the scale of the merged task vector", symbol="λ")
GAMMA = Param(
    "gamma",
    float,
    0.01,
    "γᵢ, the fraction of largest-magnitude entries dropped as outliers",
    minimum=0.0,
    maximum=1.0,
)
EPSILON = Param(
    "epsilon",
    float,
    0.15,
    "εᵢ, keep probabilities range over dᵢ ± εᵢ by magnitude rank in each row; dᵢ ± εᵢ must lie in (0, 1)",
    minimum=0.0,
    maximum=1.0,
)
SEED = Param(
    "seed",
    int,
    0,
    "seed of the random masks (a mask depends on it, the tensor and the position only)",
    per_tensor=False,
)
_EPS = 1e-7  # mergekit's `rescaled_masked_tensor`: no rescale when either L1 norm is below it


def normalize(default: bool) -> Param:
    return Param(
        "normalize",
        bool,
        default,
        "divide by the sum of the weights (with a sign election: of the models that agree with it)",
    )


def rescale(default: bool) -> Param:
    return Param(
        "rescale",
        bool,
        default,
        "scale each sparsified task vector to its original L1 norm (mergekit's rescale, not DARE's 1/d)",
    )


def sparsifies(density: float) -> bool:
    """mergekit's sparsifiers return τ unchanged (and unscaled) for a density >= 1."""
    return density < 1.0


# --- when the passes run ------------------------------------------------------------------------------


def _density_below_one(params: Mapping[str, Setting], models: Sequence[Mapping[str, Setting]]) -> bool:
    """Whether some model's `density` (its own, `[parameters]`' or the default 1) can be below 1."""
    settings = [params.get("density", DENSITY.default), *(m["density"] for m in models if "density" in m)]
    return any(float(v) < 1.0 for setting in settings if setting is not None for v in scalars(setting))


def _rescaling(params: Mapping[str, Setting], models: Sequence[Mapping[str, Setting]]) -> bool:
    return _density_below_one(params, models) and any(scalars(params.get("rescale", False)))


# --- the sparsifiers' kept entries --------------------------------------------------------------------


def _band(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """Breadcrumbs: (n_bot, target_n), the kept ranks [n_bot, n_bot + target_n) of ascending |τ|."""
    target = int(density * numel)
    return max(0, numel - target - int(gamma * numel)), target


def _magnitude_ranks(numel: int, s: Slice) -> list[int]:
    """Per model, the rank (ascending, 1-based) of the k-th largest |τᵢ|: N − k + 1; 0 when not sparsified."""
    ranks = []
    for p in s.model_params:
        d = float(p["density"])
        ranks.append(numel - max(1, int(d * numel)) + 1 if 0 < d < 1 else 0)
    return ranks


def _band_ranks(numel: int, s: Slice) -> list[int]:
    """Per model, two ranks: the band's lowest kept one and its highest (0: no cut on that side)."""
    ranks = []
    for p in s.model_params:
        d = float(p["density"])
        bottom, target = _band(numel, d, float(p["gamma"]))
        low = bottom + 1 if sparsifies(d) and bottom > 0 and target > 0 else 0
        high = bottom + target if sparsifies(d) and 0 < bottom + target < numel else 0
        ranks += [low, high]
    return ranks


def magnitudes(s: Slice, stats: Stats) -> Tensor:
    """|τᵢ| of one slice, one flat float32 row per model, on the CPU (where the selection counts)."""
    import torch

    assert s.base is not None
    base = s.base.flatten()
    out = torch.empty((len(s.models), base.numel()), dtype=base.dtype, device=base.device)
    for row, model in zip(out, s.models, strict=True):
        torch.sub(model.flatten(), base, out=row).abs_()
    return out.to("cpu", torch.float32)


def _band_magnitudes(s: Slice, stats: Stats) -> Tensor:
    return magnitudes(s, stats).repeat_interleave(2, dim=0)  # one series per cut: two per model


def _row_probabilities(magnitude: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's keep probabilities for rows of |τ| (rows, C): (d − ε) + rank/(C − 1) · 2ε.

    mergekit normalises the ranks 1..C by (rank − 1)/(C − 1); equal magnitudes take their ranks in
    position order here (mergekit's argsort leaves it unspecified). A row of one entry gets d (mergekit
    divides 0 by 0 there). A row is everything after the first dimension (mergekit ranks along dim 1,
    the same for the 2-D tensors of Qwen2).
    """
    import torch

    columns = magnitude.shape[1]
    if columns < 2:
        return torch.full_like(magnitude, density, dtype=torch.float32)
    order = magnitude.argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(columns, device=order.device).expand_as(order))
    rank_norm = ranks.to(torch.float32) / (columns - 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


@dataclass
class _Norms:
    """A rescale pass's result: per model, Σ|τᵢ| and Σ|kept τᵢ| (float64); for DELLA, the keep
    probabilities of a 1-D tensor, which is one row however many slices it spans."""

    l1: Tensor  # (models, 2)
    parts: list[Tensor]
    probabilities: Tensor | None = None


def _keep(kind: Sparsifier, s: Slice, stats: Stats, i: int, delta: Tensor) -> Tensor:
    """Model i's kept entries of τᵢ in this slice (bool), for a density below 1."""
    import torch

    p = s.model_params[i]
    d = float(p["density"])
    if kind == "random":
        return s.uniform(i) < d
    if d <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    magnitude = delta.abs()
    if kind == "magnitude":
        return magnitude >= float(stats["cut"][i])
    if kind == "magnitude_outliers":
        bottom, target = _band(s.numel, d, float(p["gamma"]))
        low, high = (float(v) for v in stats["band"][2 * i : 2 * i + 2])
        if target == 0:
            return torch.zeros_like(delta, dtype=torch.bool)
        keep = magnitude >= low
        return keep & (magnitude <= high) if bottom + target < s.numel else keep
    # della_magprune: per-row ranks; a vector's probabilities come from the pass, which saw all of it.
    if len(s.shape) < 2:
        whole: Tensor = stats["della"].probabilities[i]
        probabilities = whole[s.offset : s.offset + delta.numel()]
    else:
        rows = magnitude.reshape(-1, s.row_size)
        probabilities = _row_probabilities(rows, d, float(p["epsilon"])).view(delta.shape)
    return s.uniform(i) < probabilities.view(delta.shape).to(delta.device)


def _norms_step(kind: Sparsifier) -> Callable[[Slice, Stats, Any], Any]:
    """The rescale pass: Σ|τᵢ| and Σ|kept τᵢ| per model over the whole tensor, slice by slice."""

    def step(s: Slice, stats: Stats, acc: _Norms | None) -> _Norms:
        import torch

        assert s.base is not None
        n = len(s.models)
        if acc is None:
            acc = _Norms(torch.zeros((n, 2), dtype=torch.float64), [])
        vector = kind == "della_magprune" and len(s.shape) < 2
        if vector:  # a 1-D tensor is one DELLA row: gather |τᵢ|, rank it when the last slice is in
            acc.parts.append(magnitudes(s, stats))
            if s.offset + s.base.numel() == s.numel:
                _della_vector(s, acc)
            return acc
        if not s.params["rescale"]:
            return acc
        for i, model in enumerate(s.models):
            if not sparsifies(float(s.model_params[i]["density"])):
                continue
            delta = model - s.base
            keep = _keep(kind, s, stats, i, delta)
            magnitude = delta.abs_()
            acc.l1[i, 0] += magnitude.sum(dtype=torch.float64).cpu()
            acc.l1[i, 1] += (magnitude * keep).sum(dtype=torch.float64).cpu()
        return acc

    return step


def _della_vector(s: Slice, acc: _Norms) -> None:
    """DELLA on a whole 1-D tensor: its keep probabilities and, for rescale, its L1 norms."""
    import torch

    whole = torch.cat(acc.parts, dim=1)
    acc.parts = []
    acc.probabilities = torch.empty_like(whole)
    for i, (row, p) in enumerate(zip(whole, s.model_params, strict=True)):
        d = float(p["density"])
        if not sparsifies(d):
            continue
        if d <= 0:
            acc.probabilities[i] = 0.0
            continue
        acc.probabilities[i] = _row_probabilities(row.view(1, -1), d, float(p["epsilon"]))[0]
        if s.params["rescale"]:
            u = uniform(int(s.params.get("seed", 0)), s.name, i, 0, row.numel())
            acc.l1[i, 0] = row.sum(dtype=torch.float64)
            acc.l1[i, 1] = (row * (u < acc.probabilities[i])).sum(dtype=torch.float64)


def passes(kind: Sparsifier) -> tuple[_Pass, ...]:
    norms = Reduce(
        "della" if kind == "della_magprune" else "l1",
        _norms_step(kind),
        when=_density_below_one if kind == "della_magprune" else _rescaling,
    )
    if kind == "magnitude":
        return (Select("cut", magnitudes, _magnitude_ranks, when=_density_below_one), norms)
    if kind == "magnitude_outliers":
        return (Select("band", _band_magnitudes, _band_ranks, when=_density_below_one), norms)
    return (norms,)


# --- the merge step ---------------------------------------------------------------------------------------


def gta_merge(
    kind: Sparsifier | None, consensus: bool, scale: str = "lambda"
) -> Callable[[Slice, Stats], Tensor]:
    """mergekit's `merge_group` for one slice, in its order of operations (module docstring).

    `scale` names the parameter holding λ (`scaling_factor` in `task_arithmetic`).
    """

    def merge(s: Slice, stats: Stats) -> Tensor:
        import torch

        assert s.base is not None
        base = s.base
        n = len(s.models)
        deltas = torch.empty((n, *base.shape), dtype=base.dtype, device=base.device)
        for i, (row, model, p) in enumerate(zip(deltas, s.models, s.model_params, strict=True)):
            torch.sub(model, base, out=row)
            if kind is None or not sparsifies(float(p["density"])):
                continue
            row.mul_(_keep(kind, s, stats, i, row))  # x·0 as mergekit's mask multiply: −0 stays −0
            if s.params["rescale"]:
                before, after = stats["della" if kind == "della_magprune" else "l1"].l1[i].to(torch.float32)
                if before >= _EPS and after >= _EPS:
                    row.mul_((before / after).to(row.device))
        weights = torch.tensor(s.weights(), dtype=base.dtype, device=base.device).view(n, *(1,) * base.dim())
        deltas.mul_(weights)
        if consensus:
            elected = (deltas.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
            agree = deltas.sign() == elected
            mixed = (deltas * agree).sum(dim=0)
            divisor = (weights * agree).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if s.params["normalize"]:
            mixed /= divisor
        lam = float(s.params[scale])
        if lam != 1:
            mixed *= lam
        return base + mixed

    return merge


def _check_della(p: Mapping[str, Any]) -> str | None:
    d, epsilon = float(p["density"]), float(p["epsilon"])
    if 0 < d < 1 and not (d - epsilon > 0 and d + epsilon < 1):
        return f"density ± epsilon must lie in (0, 1), got density {d:g} and epsilon {epsilon:g}"
    return None


def mergekit_params(
    normalize: bool,
    rescale: bool,
    per_model: Mapping[str, float] | None = None,
    renamed: Mapping[str, str] | None = None,
) -> MergekitParams:
    """mergekit's `GeneralizedTaskArithmeticMerge` parameters (generalized_task_arithmetic.py, registry.py):
    its defaults of `normalize` and `rescale`, and the per-model parameters beyond weight and density."""
    return MergekitParams(
        shared={"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0},
        per_model={"weight": None, "density": 1.0, **(per_model or {})},
        renamed=renamed or {},
    )


def method(
    name: str,
    title: str,
    formula: str,
    sparsifier: Sparsifier,
    consensus: bool,
    normalize_default: bool,
    rescale_default: bool,
    paper: str,
    citation: Citation,
    notes: str,
) -> Method:
    """One mergekit GTA method: its parameters (mergekit's names and defaults), passes and merge step."""
    model_params = (WEIGHT, DENSITY) + (
        (GAMMA,)
        if sparsifier == "magnitude_outliers"
        else (EPSILON,)
        if sparsifier == "della_magprune"
        else ()
    )
    random = sparsifier in ("random", "della_magprune")
    return Method(
        name=name,
        title=title,
        formula=formula,
        contract=Contract(base="required"),
        merge=gta_merge(sparsifier, consensus),
        params=(LAMBDA, normalize(normalize_default), rescale(rescale_default)) + ((SEED,) if random else ()),
        model_params=model_params,
        passes=passes(sparsifier),
        paper=paper,
        citation=citation,
        mergekit=name.removeprefix("mergekit_"),
        mergekit_params=mergekit_params(
            normalize_default,
            rescale_default,
            {p.name: float(p.default) for p in model_params if p in (GAMMA, EPSILON) and p.default is not None},
        ),
        notes=f"{notes} {reads_note(sparsifier)}",
        check=_check_della if sparsifier == "della_magprune" else None,
    )


# The papers of the family (a method file names its own).
DARE = Citation(
    "Yu et al. 2024",
    "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
    "Le Yu and Bowen Yu and Haiyang Yu and Fei Huang and Yongbin Li",
    2024,
    "yu2024languagemodelssupermario",
)
BREADCRUMBS = Citation(
    "Davari & Belilovsky 2024",
    "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
    "MohammadReza Davari and Eugene Belilovsky",
    2024,
    "davari2024modelbreadcrumbs",
)
DELLA = Citation(
    "Deep et al. 2024",
    "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling",
    "Pala Tej Deep and Rishabh Bhardwaj and Soujanya Poria",
    2024,
    "deep2024dellamerging",
)
TIES = Citation(
    "Yadav et al. 2023",
    "TIES-Merging: Resolving Interference When Merging Models",
    "Prateek Yadav and Derek Tam and Leshem Choshen and Colin Raffel and Mohit Bansal",
    2023,
    "yadav2023tiesmerging",
)


def reads_note(sparsifier: Sparsifier) -> str:
    """What the method costs in reads of the inputs, for its notes."""
    if sparsifier == "magnitude":
        return (
            "Costs one read with every density 1; with a density below 1, one more for the magnitude "
            "cut-offs (a Select; two more where its sample misses) and, with rescale, one for the L1 norms."
        )
    if sparsifier == "magnitude_outliers":
        return (
            "Costs one read with every density 1; with a density below 1, one more for the two cut-offs "
            "per model (a Select; two more where its sample misses) and, with rescale, one for the L1 norms."
        )
    if sparsifier == "random":
        return "Costs one read, and one more for the L1 norms when rescale is on with a density below 1."
    return (
        "Costs one read with every density 1, else two: a pass ranks 1-D tensors as one row (mergekit's "
        "view of a vector) and sums the L1 norms for rescale."
    )
