"""mergekit's generalized task arithmetic family against a whole-tensor reference written here.

`ref_gta` is mergekit 0.1.5's `GeneralizedTaskArithmeticMerge.merge_group` restated on whole tensors:
sparsify each τᵢ (magnitude top-k, random, breadcrumbs band, DELLA's per-row ranks), rescale by L1
norms, weight, elect signs or not, normalize, scale, add the base. The engine streams slices; agreeing
with the reference, bit for bit without rescale, is the proof that streaming changed nothing. Random
masks draw from `hubmerge.merging.methods.uniform` (u < p keeps), the documented source of every random method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from support.checkpoints import random_state_dict, write_checkpoint
from support.reference import load_f32, with_head

import hubmerge
from hubmerge.errors import RecipeError
from hubmerge.merging import plan as plan_module
from hubmerge.merging.methods import METHODS, uniform
from hubmerge.merging.schedule import Gradient

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
    # Only the weights are compared: no diagnostics (their plots cost seconds per merge).
    result = hubmerge.merge(recipe, push=False, quiet=True, stats=False, sanity=False, log=lambda _: None)
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# --- random masks -----------------------------------------------------------------------------------------


def one_model(
    tmp_path: Path, method: str, parameters: str, out: str
) -> tuple[StateDict, StateDict, StateDict]:
    """(base, model, merged) for `method` on one float32 model with weight 1 and λ 1: merged − base is the
    sparsified (and maybe rescaled) task vector itself."""
    if not (tmp_path / "models" / "math").exists():
        make_pool(tmp_path, F32_TIED)
    base, model = (load_f32(tmp_path / "models" / n) for n in ("base", "math"))
    merged = merge(
        tmp_path, f'method = "{method}"\n{POOL}models = ["models/math"]\n[parameters]\n{parameters}', out
    )
    return base, model, merged


def kept(base: StateDict, merged: StateDict) -> dict[str, torch.Tensor]:
    return {k: merged[k] != base[k] for k in base}


def binomial_bound(p: float, n: int) -> float:
    return 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_keep_fraction_is_density_and_the_seed_changes_the_mask(tmp_path, method):
    density, epsilon = 0.3, 0.0 if method == "dare_linear" else 0.2
    params = f"density = {density}\nrescale = false\n" + (f"epsilon = {epsilon}\n" if epsilon else "")
    base, model, first = one_model(tmp_path, method, params + "seed = 1\n", "seed1")
    _, _, second = one_model(tmp_path, method, params + "seed = 2\n", "seed2")
    masks, other = kept(base, first), kept(base, second)
    total = sum(m.numel() for m in masks.values())
    fraction = sum(int(m.sum()) for m in masks.values()) / total
    assert abs(fraction - density) < binomial_bound(density, total)
    big = masks["model.layers.0.mlp.up_proj.weight"]
    assert abs(float(big.float().mean()) - density) < binomial_bound(density, big.numel())
    # Kept entries are the model's own task vector, untouched (no rescale).
    for k, m in masks.items():
        assert torch.equal(first[k][m], (base[k] + (model[k] - base[k]))[m])
    # Another seed: a different mask, as different as two independent draws are: 2·E[p(1 − p)], with p
    # spread evenly over d ± ε for DELLA (variance ε²/3).
    differ = sum(int((m != o).sum()) for m, o in zip(masks.values(), other.values(), strict=True)) / total
    expected = 2 * (density * (1 - density) - epsilon**2 / 3)
    assert abs(differ - expected) < binomial_bound(expected, total)


def test_della_keeps_larger_magnitudes_more_often(tmp_path):
    base, model, merged = one_model(
        tmp_path, "della_linear", "density = 0.5\nepsilon = 0.4\nrescale = false\n", "o"
    )
    low = high = 0.0
    for k, m in kept(base, merged).items():
        rows = (
            (model[k] - base[k]).abs().view(-1, m.shape[-1])
            if m.dim() > 1
            else (model[k] - base[k]).abs()[None]
        )
        order = rows.argsort(dim=1, stable=True).argsort(dim=1).float() / (rows.shape[1] - 1)
        low += float(m.view_as(rows)[order < 0.25].float().mean())
        high += float(m.view_as(rows)[order >= 0.75].float().mean())
    # Keep probability runs from d − ε = 0.1 at the smallest magnitude to d + ε = 0.9 at the largest.
    assert high / len(base) > 0.75 and low / len(base) < 0.25


@pytest.mark.slow
def test_rescale_matches_each_tensors_l1_norm(tmp_path):
    """mergekit's rescale: ‖kept τ‖₁ scaled up to ‖τ‖₁ per tensor, not the paper's 1/d."""
    base, model, merged = one_model(tmp_path, "dare_linear", "density = 0.3\nseed = 5\n", "rescaled")
    _, _, plain = one_model(tmp_path, "dare_linear", "density = 0.3\nseed = 5\nrescale = false\n", "plain")
    for k in base:
        delta, kept_delta, scaled = model[k] - base[k], plain[k] - base[k], merged[k] - base[k]
        l1, kept_l1 = float(delta.abs().sum()), float(kept_delta.abs().sum())
        assert float(scaled.abs().sum()) == pytest.approx(l1, rel=1e-5), k
        assert torch.allclose(scaled, kept_delta * (l1 / kept_l1), rtol=1e-5, atol=1e-6), (
            k
        )  # θ − θ_base near 1
        assert abs(l1 / kept_l1 - 1 / 0.3) > 1e-3 or k.endswith("bias")  # not DARE's 1/p in general


# --- ties at the magnitude cut-offs ---------------------------------------------------------------------


def tiered_pool(tmp_path: Path, dtype: torch.dtype) -> StateDict:
    """A zero base and one model whose |τ| takes three values, a third of the entries each, in every
    tensor: magnitude cut-offs fall on many equal entries."""
    base = {k: torch.zeros_like(v) for k, v in random_state_dict(0, VOCAB).items()}
    model = {}
    for k, v in base.items():
        n = v.numel()
        tiers = torch.tensor([0.125, 0.25, 0.5])[torch.arange(n) % 3]
        signs = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
        model[k] = (tiers * signs)[torch.randperm(n, generator=torch.Generator().manual_seed(n))].view_as(v)
    write_checkpoint(tmp_path / "models" / "base", base, dtype=dtype)
    write_checkpoint(tmp_path / "models" / "math", model, dtype=dtype)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equal_magnitudes_at_the_cut_are_all_kept(tmp_path, dtype):
    """mergekit keeps exactly k = int(d·N) entries, an unspecified k of those tied at the cut; hubmerge
    keeps every entry at or above the k-th largest magnitude (the documented rule)."""
    model = tiered_pool(tmp_path, dtype)
    one = f'{POOL}models = ["models/math"]\n[parameters]\n'
    ties = merge(tmp_path, f'method = "mergekit_ties"\n{one}density = 0.5\n', "ties")
    crumbs = merge(tmp_path, f'method = "breadcrumbs"\n{one}density = 0.4\ngamma = 0.4\n', "crumbs")
    for k, tau in model.items():
        n = tau.numel()
        if n < 6:
            continue
        # k = N/2 lands in the middle tier (0.25): both upper tiers stay, 2N/3 entries, more than k.
        assert torch.equal(ties[k] != 0, tau.abs() >= 0.25), k
        assert int((ties[k] != 0).sum()) > int(0.5 * n)
        assert torch.equal(ties[k][ties[k] != 0], tau[tau.abs() >= 0.25])
        # Breadcrumbs keeps ascending ranks [0.2N, 0.6N): both cut-offs fall inside a tier (0.125 and
        # 0.25), so both tiers stay whole, 2N/3 entries where mergekit keeps 0.4N.
        assert torch.equal(crumbs[k] != 0, tau.abs() <= 0.25), k
        assert int((crumbs[k] != 0).sum()) > int(0.4 * n)


@pytest.mark.slow
def test_distinct_magnitudes_keep_exactly_mergekits_count(tmp_path):
    """With distinct magnitudes (random float32), the cut-offs keep exactly what mergekit's argsort
    keeps: the k = max(1, int(d·N)) largest for TIES, ascending ranks [n_bot, n_bot + int(dN)) for
    breadcrumbs."""
    base, model, ties = one_model(tmp_path, "mergekit_ties", "density = 0.35\n", "ties")
    _, _, crumbs = one_model(tmp_path, "breadcrumbs", "density = 0.35\ngamma = 0.1\n", "crumbs")
    for k in base:
        magnitude = (model[k] - base[k]).abs().flatten()
        n = magnitude.numel()
        assert magnitude.unique().numel() == n
        top = torch.zeros(n, dtype=torch.bool)
        top[magnitude.argsort(descending=True)[: max(1, int(0.35 * n))]] = True
        assert torch.equal((ties[k] != base[k]).flatten(), top), k
        target, bottom = int(0.35 * n), max(0, n - int(0.35 * n) - int(0.1 * n))
        band = torch.zeros(n, dtype=torch.bool)
        band[magnitude.argsort()[bottom : bottom + target]] = True
        assert torch.equal((crumbs[k] != base[k]).flatten(), band), k


# --- parameters -------------------------------------------------------------------------------------------


def layer_t(name: str) -> float:
    """The gradient position mergekit gives a tensor: layer / (layers − 1), 0 outside the layers."""
    return float(name.split(".")[2]) if name.startswith("model.layers.") else 0.0  # 2 layers: t = layer


@pytest.mark.slow
def test_gradient_and_filter_values_reach_the_right_tensors(tmp_path):
    base, models = make_pool(tmp_path, BF16_UNTIED)
    recipe = (
        'method = "mergekit_ties"\n'
        + POOL
        + '[[models]]\nsource = "models/math"\ndensity = [{filter = "mlp", value = 0.3}, {value = 0.9}]\n'
        + '[[models]]\nsource = "models/code"\nweight = [0.2, 0.8]\n'
        + '[[models]]\nsource = "models/instruct"\nweight = [{filter = "self_attn", value = [1.0, 0.5]}, {value = 0.7}]\n'
        + "[parameters]\ndensity = [0.4, 0.6]\nnormalize = false\n"
    )
    got = merge(tmp_path, recipe)
    want = ref_gta(
        base,
        models,
        "magnitude",
        True,
        weight=[
            1.0,
            lambda n: 0.2 + 0.6 * layer_t(n),
            lambda n: (1.0 - 0.5 * layer_t(n)) if "self_attn" in n else 0.7,
        ],
        density=[
            lambda n: 0.3 if "mlp" in n else 0.9,
            lambda n: 0.4 + 0.2 * layer_t(n),
            lambda n: 0.4 + 0.2 * layer_t(n),
        ],
    )
    # Every kind of tensor is there: embedding, attention and MLP of the first and last layers, norms, head.
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(want)
    assert_matches(got, want, torch.bfloat16, exact=True)


@pytest.mark.parametrize(
    ("method", "models", "message"),
    [
        ("mergekit_ties", "density = 1.5\n", "models[0].density: must be <= 1"),
        ("dare_ties", "density = -0.1\n", "models[0].density: must be >= 0"),
        ("breadcrumbs", "gamma = 2.0\n", "models[0].gamma: must be <= 1"),
        (
            "della",
            "density = 0.1\n",
            "models[0]: density ± epsilon must lie in (0, 1), got density 0.1 and epsilon 0.15",
        ),
        ("della_linear", "density = 0.9\nepsilon = 0.1\n", "got density 0.9 and epsilon 0.1"),
    ],
)
def test_out_of_range_parameters_are_one_recipe_error(tmp_path, make_model, method, models, message):
    make_model("base", 0, vocab=VOCAB)
    make_model("math", 1, vocab=VOCAB)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'method = "{method}"\n{POOL}[[models]]\nsource = "models/math"\n{models}')
    with pytest.raises(RecipeError) as error:
        hubmerge.merge(recipe, push=False, quiet=True, sanity=False, log=lambda _: None)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "outputs").exists()


def test_della_accepts_densities_that_skip_its_check(tmp_path, make_model):
    """mergekit checks d ± ε only where it prunes: d = 1 (no pruning) passes with any ε."""
    make_model("base", 0, vocab=VOCAB)
    make_model("math", 1, vocab=VOCAB)
    got = merge(tmp_path, f'method = "della"\n{POOL}[[models]]\nsource = "models/math"\nepsilon = 0.9\n')
    assert got


@pytest.mark.parametrize(
    ("method", "params", "models", "reads"),
    [
        ("task_arithmetic", {}, [{}], 1),
        ("task_arithmetic", {}, [{"density": 0.5}], 2),
        ("task_arithmetic", {"rescale": True}, [{"density": 0.5}], 3),
        ("mergekit_ties", {}, [{}, {}], 1),
        ("mergekit_ties", {"density": 0.5}, [{}], 2),
        ("mergekit_ties", {"rescale": True}, [{"density": 1.0}, {"density": Gradient((0.2, 1.0))}], 3),
        ("dare_ties", {}, [{}], 1),
        ("dare_ties", {"density": 0.5}, [{}], 2),  # rescale is on by default
        ("dare_linear", {"density": 0.5, "rescale": False}, [{}], 1),
        ("breadcrumbs", {"density": 0.9}, [{}], 2),
        ("breadcrumbs_ties", {"density": 0.9, "rescale": True}, [{}], 3),
        ("della", {}, [{}], 1),
        ("della_linear", {"rescale": False}, [{"density": 0.5}], 2),
    ],
)
def test_reads_count_the_passes_a_recipe_switches_on(method, params, models, reads):
    m = METHODS[method]
    settings = {**{p.name: p.default for p in m.params}, **params}
    assert m.reads(settings, models) == reads


def test_each_ties_says_which_one_it_is():
    assert "FusionBench" in METHODS["ties"].notes and "mergekit_ties" in METHODS["ties"].notes
    assert "FusionBench" in METHODS["mergekit_ties"].notes and METHODS["mergekit_ties"].mergekit == "ties"
    assert METHODS["ties"].mergekit is None


@pytest.mark.slow
def test_task_arithmetic_without_the_extras_is_fusionbenchs_bit_for_bit(tmp_path):
    """density 1 and normalize false (set or not) take FusionBench's path: the same bytes as before."""
    make_pool(tmp_path, BF16_UNTIED)
    body = 'method = "task_arithmetic"\n' + POOL + models_toml(weight=[2.0, None, -0.5])
    merge(tmp_path, body + "[parameters]\nscaling_factor = 0.7\n", "plain")
    merge(
        tmp_path,
        body + "[parameters]\nscaling_factor = 0.7\ndensity = 1.0\nnormalize = false\nrescale = true\n",
        "explicit",
    )
    assert files(tmp_path / "explicit") == files(tmp_path / "plain")
    assert METHODS["task_arithmetic"].reads({"rescale": True, "density": 1.0}, [{}]) == 1
