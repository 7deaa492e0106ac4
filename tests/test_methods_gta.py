"""mergekit's generalized task arithmetic family against a whole-tensor reference written here.

`ref_gta` is mergekit 0.1.5's `GeneralizedTaskArithmeticMerge.merge_group` restated on whole tensors:
sparsify each τᵢ (magnitude top-k, random, breadcrumbs band, DELLA's per-row ranks), rescale by L1
norms, weight, elect signs or not, normalize, scale, add the base. The engine streams slices; agreeing
with the reference, bit for bit without rescale, is the proof that streaming changed nothing. Random
masks draw from `hubmerge.methods.uniform` (u < p keeps), the documented source of every random method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from conftest import random_state_dict, write_checkpoint
from test_merge import load_f32, with_head

import hubmerge
from hubmerge import plan as plan_module
from hubmerge.errors import RecipeError
from hubmerge.methods import METHODS, uniform

StateDict = dict[str, torch.Tensor]
PerModel = list[Any]  # one value per model: a number, or a function of the tensor name
VOCAB = 64  # a short embedding keeps slice counts (and run time) small; it still spans many slices
POOL = 'base = "models/base"\n'
MODELS = ("math", "code", "instruct")


# --- the reference --------------------------------------------------------------------------------------


def value(setting: Any, name: str) -> float:
    return float(setting(name) if callable(setting) else setting)


def ref_keep(
    kind: str, delta: torch.Tensor, name: str, i: int, d: float, gamma: float, epsilon: float, seed: int
):
    n = delta.numel()
    magnitude = delta.abs()
    if kind == "random":
        return uniform(seed, name, i, 0, n).view_as(delta) < d
    if d <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    if kind == "magnitude":
        k = max(1, int(d * n))  # mergekit keeps the k largest; equal magnitudes at the cut all stay here
        return magnitude >= magnitude.flatten().kthvalue(n - k + 1).values
    if kind == "magnitude_outliers":
        target = int(d * n)
        bottom = max(0, n - target - int(gamma * n))
        if target == 0:
            return torch.zeros_like(delta, dtype=torch.bool)
        ordered = magnitude.flatten().sort().values
        return (magnitude >= ordered[bottom]) & (magnitude <= ordered[bottom + target - 1])
    rows = magnitude.view(1, -1) if delta.dim() < 2 else magnitude
    ranks = rows.argsort(dim=1, stable=True).argsort(dim=1)
    p = (d - epsilon) + ranks.float() / (rows.shape[1] - 1) * 2 * epsilon
    return uniform(seed, name, i, 0, n).view_as(delta) < p.view_as(delta)


def ref_gta(
    base: StateDict,
    models: list[StateDict],
    kind: str | None,
    consensus: bool,
    *,
    weight: PerModel,
    density: PerModel,
    lam: float = 1.0,
    normalize: bool = False,
    rescale: bool = False,
    gamma: PerModel | None = None,
    epsilon: PerModel | None = None,
    seed: int = 0,
) -> StateDict:
    out = {}
    for name, b in base.items():
        deltas, weights = [], []
        for i, m in enumerate(models):
            delta, d = m[name] - b, value(density[i], name)
            if kind is not None and d < 1:
                g = value(gamma[i], name) if gamma else 0.0
                e = value(epsilon[i], name) if epsilon else 0.0
                masked = delta * ref_keep(kind, delta, name, i, d, g, e, seed)
                if rescale:
                    before, after = delta.abs().sum(), masked.abs().sum()
                    if before >= 1e-7 and after >= 1e-7:
                        masked = masked * (before / after)
                delta = masked
            deltas.append(delta)
            weights.append(value(weight[i], name))
        w = torch.tensor(weights).view(-1, *(1,) * b.dim())
        stacked = torch.stack(deltas) * w
        if consensus:
            elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
            agree = stacked.sign() == elected
            mixed, divisor = (stacked * agree).sum(0), (w * agree).sum(0)
            divisor[divisor == 0] = 1
        else:
            mixed, divisor = stacked.sum(0), w.sum(0)
            divisor[divisor.abs() < 1e-8] = 1
        if normalize:
            mixed = mixed / divisor
        if lam != 1:
            mixed = mixed * lam
        out[name] = b + mixed
    return out


# --- helpers -------------------------------------------------------------------------------------------


class Layout(NamedTuple):
    dtype: torch.dtype
    heads: tuple[bool, bool, bool, bool]  # which of base, math, code, instruct store lm_head


F32_TIED = Layout(torch.float32, (False,) * 4)
BF16_UNTIED = Layout(torch.bfloat16, (True,) * 4)
BF16_MIXED = Layout(torch.bfloat16, (True, False, True, False))


def make_pool(tmp_path: Path, layout: Layout) -> tuple[StateDict, list[StateDict]]:
    sds = []
    for seed, (name, head) in enumerate(zip(("base", *MODELS), layout.heads, strict=True)):
        folder = write_checkpoint(
            tmp_path / "models" / name, random_state_dict(seed, VOCAB, head), dtype=layout.dtype
        )
        sds.append(load_f32(folder))
    if any(layout.heads):  # the output gets a real head: a tied source's head is its embedding
        sds = [with_head(sd) for sd in sds]
    return sds[0], sds[1:]


def merge(tmp_path: Path, body: str, out: str = "out") -> StateDict:
    recipe = tmp_path / f"{out}.toml"
    recipe.write_text(body + f'\n[output]\ndir = "{out}"\n')
    result = hubmerge.merge(recipe, push=False, quiet=True, sanity=False, log=lambda _: None)
    return load_f32(result.output_dir)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("model*"))}


def models_toml(**per_model: list[Any]) -> str:
    """[[models]] tables with the given per-model values (a list per parameter, one value per model)."""
    text = ""
    for i, name in enumerate(MODELS):
        text += f'[[models]]\nsource = "models/{name}"\n'
        for key, values in per_model.items():
            if values[i] is not None:
                text += f"{key} = {values[i]}\n"
    return text


def assert_matches(got: StateDict, want: StateDict, dtype: torch.dtype, exact: bool) -> None:
    """Bit for bit (one rounding of the same float32 value), or, where the reference's float32 L1 sums
    (rescale) round differently from the engine's float64 ones, within 1e-7 (one bf16 ulp in bf16)."""
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        expected = w.to(dtype).float()
        if exact:
            assert torch.equal(got[k], expected), (k, (got[k] - expected).abs().max())
        else:  # the rescale factor differs in its last float32 bits: ~1e-9 in a value, or one bf16 rounding
            ulp = torch.exp2(torch.floor(torch.log2(expected.abs().clamp(min=1e-30))) - 7)
            tolerance = ulp.clamp(min=1e-7) if dtype == torch.bfloat16 else torch.full_like(ulp, 1e-7)
            assert ((got[k] - expected).abs() <= tolerance).all(), (k, (got[k] - expected).abs().max())


# --- the cases ------------------------------------------------------------------------------------------


class Case(NamedTuple):
    recipe: str
    reference: Callable[[StateDict, list[StateDict]], StateDict]
    exact: bool  # no rescale: bit for bit in float32


WEIGHTS = [1.0, 0.5, -0.3]
CASES = {
    "mergekit_ties": Case(
        'method = "mergekit_ties"\n'
        + POOL
        + models_toml(weight=WEIGHTS, density=[0.5, 0.3, 0.7])
        + "[parameters]\nlambda = 0.9\n",
        lambda b, ms: ref_gta(
            b, ms, "magnitude", True, weight=WEIGHTS, density=[0.5, 0.3, 0.7], lam=0.9, normalize=True
        ),
        True,
    ),
    "dare_ties": Case(
        'method = "dare_ties"\n'
        + POOL
        + models_toml(weight=WEIGHTS, density=[0.4, 0.6, 0.2])
        + "[parameters]\nseed = 7\n",
        lambda b, ms: ref_gta(
            b, ms, "random", True, weight=WEIGHTS, density=[0.4, 0.6, 0.2], rescale=True, seed=7
        ),
        False,
    ),
    "dare_linear": Case(
        'method = "dare_linear"\n'
        + POOL
        + models_toml(weight=[0.6, 0.3, 0.1])
        + "[parameters]\ndensity = 0.5\nnormalize = true\nrescale = false\nlambda = 1.5\n",
        lambda b, ms: ref_gta(
            b, ms, "random", False, weight=[0.6, 0.3, 0.1], density=[0.5] * 3, lam=1.5, normalize=True
        ),
        True,
    ),
    "breadcrumbs": Case(
        'method = "breadcrumbs"\n'
        + POOL
        + models_toml(weight=WEIGHTS, density=[0.8, 0.5, 0.9], gamma=[0.05, 0.2, None]),
        lambda b, ms: ref_gta(
            b,
            ms,
            "magnitude_outliers",
            False,
            weight=WEIGHTS,
            density=[0.8, 0.5, 0.9],
            gamma=[0.05, 0.2, 0.01],
        ),
        True,
    ),
    "breadcrumbs_ties": Case(
        'method = "breadcrumbs_ties"\n'
        + POOL
        + models_toml(weight=WEIGHTS)
        + "[parameters]\ndensity = 0.5\ngamma = 0.1\nrescale = true\nnormalize = true\n",
        lambda b, ms: ref_gta(
            b,
            ms,
            "magnitude_outliers",
            True,
            weight=WEIGHTS,
            density=[0.5] * 3,
            gamma=[0.1] * 3,
            rescale=True,
            normalize=True,
        ),
        False,
    ),
    "della": Case(
        'method = "della"\n'
        + POOL
        + models_toml(weight=WEIGHTS, density=[0.6, 0.4, 0.5], epsilon=[0.2, 0.1, None])
        + "[parameters]\nseed = 3\n",
        lambda b, ms: ref_gta(
            b,
            ms,
            "della_magprune",
            True,
            weight=WEIGHTS,
            density=[0.6, 0.4, 0.5],
            epsilon=[0.2, 0.1, 0.15],
            normalize=True,
            rescale=True,
            seed=3,
        ),
        False,
    ),
    "della_linear": Case(
        'method = "della_linear"\n'
        + POOL
        + models_toml(weight=[0.6, 0.3, 0.1])
        + "[parameters]\ndensity = 0.5\nepsilon = 0.1\nrescale = false\n",
        lambda b, ms: ref_gta(
            b, ms, "della_magprune", False, weight=[0.6, 0.3, 0.1], density=[0.5] * 3, epsilon=[0.1] * 3
        ),
        True,
    ),
    "task_arithmetic_density_normalize": Case(
        'method = "task_arithmetic"\n'
        + POOL
        + models_toml(weight=[2.0, 1.0, -0.5], density=[0.3, None, 0.6])
        + "[parameters]\nscaling_factor = 0.7\nnormalize = true\n",
        lambda b, ms: ref_gta(
            b,
            ms,
            "magnitude",
            False,
            weight=[2.0, 1.0, -0.5],
            density=[0.3, 1.0, 0.6],
            lam=0.7,
            normalize=True,
        ),
        True,
    ),
    "task_arithmetic_rescale": Case(
        'method = "task_arithmetic"\n'
        + POOL
        + models_toml(weight=[1.0, 0.5, 0.5])
        + "[parameters]\nscaling_factor = 1.0\ndensity = 0.4\nrescale = true\n",
        lambda b, ms: ref_gta(
            b, ms, "magnitude", False, weight=[1.0, 0.5, 0.5], density=[0.4] * 3, rescale=True
        ),
        False,
    ),
}


@pytest.mark.parametrize("layout", [F32_TIED, BF16_UNTIED], ids=["f32-tied", "bf16-untied"])
@pytest.mark.parametrize("case", CASES)
def test_method_matches_the_whole_tensor_reference(tmp_path, case, layout):
    base, models = make_pool(tmp_path, layout)
    got = merge(tmp_path, CASES[case].recipe)
    assert_matches(got, CASES[case].reference(base, models), layout.dtype, CASES[case].exact)


SMALL = {  # each case once with small odd slices, the layouts spread over them
    "mergekit_ties": (F32_TIED, (7,)),
    "dare_ties": (BF16_MIXED, (7, 101)),
    "dare_linear": (F32_TIED, (101,)),
    "breadcrumbs": (BF16_UNTIED, (7,)),
    "breadcrumbs_ties": (F32_TIED, (101,)),
    "della": (F32_TIED, (7, 101)),
    "della_linear": (BF16_MIXED, (7,)),
    "task_arithmetic_density_normalize": (BF16_MIXED, (101,)),
    "task_arithmetic_rescale": (F32_TIED, (7,)),
}


@pytest.mark.parametrize("case", SMALL)
def test_small_slices_give_the_reference_and_the_same_bytes(tmp_path, monkeypatch, case):
    """Multi-slice Select and Reduce passes, 1-D DELLA rows over several slices, and random masks that
    depend on the position only: every slice size writes the same bytes."""
    layout, sizes = SMALL[case]
    base, models = make_pool(tmp_path, layout)
    merge(tmp_path, CASES[case].recipe, "default")
    want = CASES[case].reference(base, models)
    for elements in sizes:
        monkeypatch.setattr(plan_module, "CHUNK_ELEMENTS", elements)
        got = merge(tmp_path, CASES[case].recipe, f"small-{elements}")
        assert_matches(got, want, layout.dtype, CASES[case].exact)
        assert files(tmp_path / f"small-{elements}") == files(tmp_path / "default")
