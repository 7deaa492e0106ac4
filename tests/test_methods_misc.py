"""nearswap, sce and passthrough end to end, against whole-tensor references written from mergekit 0.1.5.

Each reference below is mergekit's formula on whole tensors in float32 (its expressions, in its order).
Every merge runs with the default slices and with 7- and 101-element slices (`test_slices`), which must
give the same bytes: sce's variance cut-off and weights are whole-tensor quantities gathered by passes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.checkpoints import random_state_dict, write_checkpoint
from support.reference import assert_close, load_f32, with_head

import hubmerge
from hubmerge.errors import RecipeError
from hubmerge.merging import plan as plan_module
from hubmerge.merging.methods import get_method

StateDict = dict[str, torch.Tensor]
VOCAB = 64
# (dtype, lm_head stored by every source): float32 tied as Qwen2.5 ≤ 3B, bfloat16 untied as the larger ones.
LAYOUTS = {"f32-tied": (torch.float32, False), "bf16-untied": (torch.bfloat16, True)}


def pool(tmp_path: Path, layout: str, count: int = 4) -> tuple[StateDict, list[StateDict]]:
    """base, math, code, instruct (the first `count`), written in the layout's dtype and read back."""
    dtype, head = LAYOUTS[layout]
    names = ("base", "math", "code", "instruct")[:count]
    sds = []
    for seed, name in enumerate(names):
        sd = random_state_dict(seed, VOCAB, head)
        folder = write_checkpoint(tmp_path / "models" / name, sd, dtype, vocab_size=VOCAB)
        sds.append(with_head(load_f32(folder)) if head else load_f32(folder))
    return sds[0], sds[1:]


def merge(tmp_path: Path, body: str, out: str = "out") -> StateDict:
    recipe = tmp_path / f"{out}.toml"
    recipe.write_text(body + f'\n[output]\ndir = "{out}"\n')
    return load_f32(merge_folder(recipe, out))


def merge_folder(recipe: Path, out: str) -> Path:
    log = lambda _: None  # noqa: E731
    return hubmerge.merge(
        recipe, output_dir=recipe.parent / out, push=False, quiet=True, log=log, stats=False, sanity=False
    ).output_dir  # only the weights are compared: no diagnostics (their plots cost seconds per merge)


def assert_within_one_ulp(got: StateDict, want: StateDict, dtype: torch.dtype) -> None:
    """Each value is the rounding of `want`'s to `dtype`, or its neighbour (or within 1e-6 of it, where a
    result near 0 cancels terms whose own rounding is larger than its ulp)."""
    assert sorted(got) == sorted(want)
    for k in want:
        expected = want[k].to(dtype).float()
        exponent = torch.floor(torch.log2(expected.abs().clamp(min=torch.finfo(dtype).tiny)))
        ulp = torch.finfo(dtype).eps * torch.exp2(exponent)
        assert ((got[k] - expected).abs() <= ulp.clamp(min=1e-6)).all(), (k, (got[k] - expected).abs().max())


def check(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    body: str,
    want: StateDict,
    layout: str,
    ulp: bool = False,
    sizes: tuple[int, ...] = (101,),
) -> None:
    """The merge equals `want` (one rounding of it; `ulp`: or a neighbour), with the default slices and with
    slices of `sizes` elements (7: a 2-D tensor row by row, a bias in 5 pieces; 101: 3 embedding rows at
    a time), which write the same bytes."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(body)
    dtype = LAYOUTS[layout][0]
    default = merge_folder(recipe, "out-default")
    (assert_within_one_ulp if ulp and dtype != torch.float32 else assert_close)(
        load_f32(default), want, dtype
    )
    for elements in sizes:
        monkeypatch.setattr(plan_module, "CHUNK_ELEMENTS", elements)
        small = merge_folder(recipe, f"out-{elements}")
        for file in default.glob("model*.safetensors"):
            assert (small / file.name).read_bytes() == file.read_bytes(), f"{elements}-element slices differ"


# --- references ----------------------------------------------------------------------------------------------


def ref_nearswap(base: StateDict, model: StateDict, t: float) -> StateDict:
    out = {}
    for k in base:
        weight = (t / torch.abs(base[k] - model[k]).clamp(min=1e-6)).clamp(min=0, max=1)
        out[k] = weight * model[k] + (1 - weight) * base[k]
    return out


def ref_sce_tensor(
    base: torch.Tensor, models: list[torch.Tensor], topk: float, torch_topk: bool = False
) -> torch.Tensor:
    """mergekit's sce on one tensor. Its `torch.topk` picks an arbitrary k among variances tied with the
    k-th largest; hubmerge keeps them all (`var >= k-th largest`), which is the default here. The two agree
    where there are no ties at the cut (float32 inputs)."""
    tvs = torch.stack([m - base for m in models])
    if topk < 1:
        var = torch.var(tvs, dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * topk) if topk > 0 else 0
        mask = torch.zeros_like(var)
        if k and torch_topk:
            mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
        elif k:
            mask = (var >= var.flatten().kthvalue(var.numel() - k + 1).values).to(var.dtype)
        tvs = tvs * mask.unsqueeze(0)
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    agrees = tvs.sign() == majority
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
    erased = weights.view(-1, *([1] * (tvs.dim() - 1))) * agrees
    return base + (tvs * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)


def ref_sce(base: StateDict, models: list[StateDict], topk: float, torch_topk: bool = False) -> StateDict:
    return {k: ref_sce_tensor(base[k], [m[k] for m in models], topk, torch_topk) for k in base}


def ref_passthrough(model: StateDict, scales: dict[str, float]) -> StateDict:
    def scale(name: str) -> float:
        return next((v for f, v in scales.items() if f in name), 1.0)

    return {k: v * scale(k) for k, v in model.items()}


POOL = 'base = "models/base"\nmodels = ["models/math", "models/code", "models/instruct"]\n'


# --- nearswap ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nearswap_matches_mergekits_formula_in_any_slices(tmp_path, monkeypatch, layout):
    base, (model,) = pool(tmp_path, layout, count=2)
    # t between the typical |δ| (≈ 0.03): a mix of kept, interpolated and (nearly) swapped-back entries.
    body = 'method = "nearswap"\nbase = "models/base"\nmodels = ["models/math"]\n[parameters]\nt = 0.02\n'
    want = ref_nearswap(base, model, 0.02)
    check(monkeypatch, tmp_path, body, want, layout)
    got = load_f32(tmp_path / "out-default")
    assert sum(int((got[k] == model[k].to(LAYOUTS[layout][0]).float()).sum()) for k in got) > 0


def test_nearswap_t_gradient_moves_later_layers_further_from_the_base(tmp_path):
    base, (model,) = pool(tmp_path, "f32-tied", count=2)
    body = (
        'method = "nearswap"\nbase = "models/base"\nmodels = ["models/math"]\n[parameters]\nt = [0.0, 1.0]\n'
    )
    got = merge(tmp_path, body)
    first, last = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(got[first], base[first])  # t = 0: the base
    assert torch.equal(got[last], ref_nearswap({last: base[last]}, {last: model[last]}, 1.0)[last])
    assert torch.equal(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # first value


def test_nearswap_takes_one_model_and_requires_t(tmp_path):
    pool(tmp_path, "f32-tied", count=3)
    two = 'method = "nearswap"\nbase = "models/base"\nmodels = ["models/math", "models/code"]\n[parameters]\nt = 0.1\n'
    with pytest.raises(RecipeError, match=r"models: nearswap takes exactly 1 model, got 2"):
        merge(tmp_path, two)
    with pytest.raises(RecipeError, match=r"parameters\.t: is required by nearswap"):
        merge(tmp_path, 'method = "nearswap"\nbase = "models/base"\nmodels = ["models/math"]\n')


# --- sce -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "topk"), [("f32-tied", 0.5), ("bf16-untied", 0.3), ("bf16-untied", 1.0)])
def test_sce_matches_mergekits_formula_in_any_slices(tmp_path, monkeypatch, layout, topk):
    base, models = pool(tmp_path, layout)
    body = 'method = "sce"\n' + POOL + f"[parameters]\nselect_topk = {topk}\n"
    want = ref_sce(base, models, topk)
    if layout == "f32-tied":  # no tied variances: mergekit's own torch.topk selection gives the same
        exact = ref_sce(base, models, topk, torch_topk=True)
        assert all(torch.equal(want[k], exact[k]) for k in want)
    # The weights are means over whole tensors, streamed in float64 where mergekit sums in float32: their
    # last bit can differ, and a bf16 result then be the neighbour of the reference's rounding.
    check(monkeypatch, tmp_path, body, want, layout, ulp=True, sizes=(7, 101) if topk == 0.5 else (101,))


@pytest.mark.slow
def test_sce_counts_only_positions_whose_task_vectors_differ(tmp_path, monkeypatch):
    """k = int(nz · select_topk) with nz the positions of nonzero variance, as mergekit counts: here the
    models agree on every other position of every tensor, so nz is half of each tensor, and a cut taken
    over all positions would keep twice as many."""
    base = random_state_dict(0, VOCAB)
    models = [random_state_dict(seed, VOCAB) for seed in (1, 2)]
    for k in base:
        same = torch.arange(base[k].numel()).view_as(base[k]) % 2 == 0
        models[1][k] = torch.where(same, models[0][k], models[1][k])
    for name, sd in zip(("base", "math", "code"), (base, *models), strict=True):
        write_checkpoint(tmp_path / "models" / name, sd, torch.float32, vocab_size=VOCAB)
    body = 'method = "sce"\nbase = "models/base"\nmodels = ["models/math", "models/code"]\n[parameters]\nselect_topk = 0.4\n'
    want = ref_sce(base, models, 0.4)
    check(monkeypatch, tmp_path, body, want, "f32-tied")
    got = load_f32(tmp_path / "out-default")
    name = "model.layers.0.mlp.up_proj.weight"
    changed = (got[name] != base[name]).sum()
    nz = base[name].numel() // 2
    assert int(nz * 0.4) - 1 <= changed <= int(nz * 0.4)  # kept positions move (sign-agreeing entries)


def test_sce_with_tiny_task_vectors_weights_the_models_equally(tmp_path):
    """Σᵢ mean(τᵢ²) below 10⁻⁶ gives each model the weight 1/n, as mergekit does."""
    base = random_state_dict(0, VOCAB)
    g = torch.Generator().manual_seed(5)
    models = [
        {k: v + torch.randn(v.shape, generator=g) * 1e-4 * (i + 1) for k, v in base.items()} for i in range(2)
    ]
    for name, sd in zip(("base", "math", "code"), (base, *models), strict=True):
        write_checkpoint(tmp_path / "models" / name, sd, torch.float32, vocab_size=VOCAB)
    got = merge(tmp_path, 'method = "sce"\nbase = "models/base"\nmodels = ["models/math", "models/code"]\n')
    want = ref_sce(base, models, 1.0)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6), k


def test_sce_select_topk_0_keeps_the_base(tmp_path):
    base, _ = pool(tmp_path, "f32-tied")
    got = merge(tmp_path, 'method = "sce"\n' + POOL + "[parameters]\nselect_topk = 0.0\n")
    assert all(torch.equal(got[k], base[k]) for k in base)


def test_sce_passes_run_only_when_some_select_topk_is_below_1():
    sce = get_method("sce")
    assert sce.reads({"select_topk": 1.0}, [{}]) == 2  # the weights' pass, then the merge
    assert sce.reads({"select_topk": 0.5}, [{}]) == 4  # + the nonzero count and the variance cut-off
    assert sce.max_reads() == 4


# --- passthrough ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_passthrough_scales_the_filtered_tensors_in_any_slices(tmp_path, monkeypatch, layout):
    _, (model,) = pool(tmp_path, layout, count=2)
    body = (
        'method = "passthrough"\nmodels = ["models/math"]\n[parameters]\n'
        'scale = [{filter = "o_proj", value = 0.5}, {filter = "down_proj", value = 0.25}, {value = 1.0}]\n'
    )
    check(monkeypatch, tmp_path, body, ref_passthrough(model, {"o_proj": 0.5, "down_proj": 0.25}), layout)


def test_passthrough_without_scale_writes_the_model_unchanged(tmp_path):
    _, (model,) = pool(tmp_path, "bf16-untied", count=2)
    got = merge(tmp_path, 'method = "passthrough"\nmodels = ["models/math"]\n')
    assert all(torch.equal(got[k], model[k]) for k in model)


def test_passthrough_takes_exactly_one_model(tmp_path):
    pool(tmp_path, "f32-tied", count=3)
    with pytest.raises(RecipeError, match=r"models: passthrough takes exactly 1 model, got 2"):
        merge(tmp_path, 'method = "passthrough"\nmodels = ["models/math", "models/code"]\n')


# --- what the card says of them, from their own files --------------------------------------------------------


def test_sce_card_cites_its_paper_and_explains_its_symbols(tmp_path):
    from hubmerge.api import load_plan
    from hubmerge.publish.card import render_card

    pool(tmp_path, "f32-tied")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('method = "sce"\n' + POOL + "[parameters]\nselect_topk = [0.2, 0.6]\n")
    card = render_card(load_plan(recipe))
    assert (
        "**SCE merging** (`sce`), from Wan et al. 2024, *FuseChat: Knowledge Fusion of Chat Models*" in card
    )
    assert "mᵢ: the sign-agreement mask of model i" in card and "τᵢ: the task vector θᵢ − θ_base" in card
    assert "`top_k` keeps, in every task vector" in card
    assert "| `select_topk` | \\[0.2, 0.6\\] |" in card  # escaped: filter strings come from the recipe
    assert "@misc{wan2024fusechat," in card and "eprint={2408.07990}" in card


def test_nearswap_and_passthrough_cards_name_their_parameters_and_no_paper(tmp_path):
    from hubmerge.api import load_plan
    from hubmerge.publish.card import render_card

    pool(tmp_path, "f32-tied", count=2)
    recipe = tmp_path / "nearswap.toml"
    recipe.write_text(
        'method = "nearswap"\nbase = "models/base"\nmodels = ["models/math"]\n[parameters]\nt = 0.01\n'
    )
    card = render_card(load_plan(recipe))
    assert "**NearSwap** (`nearswap`):" in card
    assert (
        "where θ: the merged parameters; θ_base: the parameters of the base; t: `t`; θ₁: the parameters of the model"
        in card
    )
    assert "| `t` | 0.01 |" in card
    recipe = tmp_path / "passthrough.toml"
    recipe.write_text('method = "passthrough"\nmodels = ["models/math"]\n[parameters]\nscale = 0.5\n')
    card = render_card(load_plan(recipe))
    assert "sᵢ: the `scale` of model i" in card
    assert "| model | `models/math` | local folder | apache-2.0 | scale = 0.5 |" in card


def test_passthrough_of_its_one_model_is_not_warned_about_as_a_copy(tmp_path):
    from hubmerge.recipe.load import load_recipe

    pool(tmp_path, "f32-tied", count=2)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('method = "passthrough"\nmodels = ["models/math"]\n')
    assert load_recipe(recipe).warnings == ()
    recipe.write_text('method = "linear"\nmodels = ["models/math"]\n')
    assert any("writes a copy" in w for w in load_recipe(recipe).warnings)
