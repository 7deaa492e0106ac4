"""Per-tensor parameters: gradients over the layers and filters on tensor names, resolved by the plan.

The rules are mergekit 0.1.5's (`schedule.py`): anchors spread evenly over t = layer / (layers − 1),
embeddings, final norm and lm_head at t = 0; the first filter that is a substring of the name wins; a
model's own setting, then `[parameters]`, then the method's default.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.checkpoints import random_state_dict, write_checkpoint
from support.cli import invoke_cli

import hubmerge
from hubmerge.errors import RecipeError
from hubmerge.merging.plan import build_plan
from hubmerge.merging.schedule import Filter, Gradient, evaluate, layer_position
from hubmerge.recipe.load import load_recipe

LAYERS = 3
# One tensor of every kind, in the first, middle and last layers.
KINDS = {
    "model.embed_tokens.weight": 0.0,
    "model.layers.0.self_attn.q_proj.weight": 0.0,
    "model.layers.0.mlp.up_proj.weight": 0.0,
    "model.layers.1.self_attn.k_proj.bias": 0.5,
    "model.layers.1.mlp.down_proj.weight": 0.5,
    "model.layers.2.input_layernorm.weight": 1.0,
    "model.layers.2.mlp.gate_proj.weight": 1.0,
    "model.norm.weight": 0.0,
    "lm_head.weight": 0.0,
}


@pytest.mark.parametrize(("name", "t"), KINDS.items())
def test_layer_position_is_layer_over_last_layer_and_zero_outside_the_layers(name: str, t: float) -> None:
    assert layer_position(name, LAYERS) == t


def test_layer_position_of_a_one_layer_model_is_zero() -> None:
    assert layer_position("model.layers.0.mlp.up_proj.weight", 1) == 0.0


@pytest.mark.parametrize(
    ("values", "t", "expected"),
    [
        ((0.2, 0.8), 0.0, 0.2),
        ((0.2, 0.8), 0.5, 0.5),
        ((0.2, 0.8), 1.0, 0.8),
        ((0.0, 0.5, 0.3, 0.7, 1.0), 0.5, 0.3),
        ((0.0, 0.5, 0.3, 0.7, 1.0), 0.375, 0.4),  # halfway between anchors 1 (t=.25) and 2 (t=.5)
        ((1.0, 0.0), 0.25, 0.75),
        ((0.7,), 0.9, 0.7),
    ],
)
def test_a_numeric_gradient_interpolates_linearly_between_evenly_spread_anchors(
    values: tuple[float, ...], t: float, expected: float
) -> None:
    assert Gradient(values).at(t) == pytest.approx(expected, abs=1e-12)


def test_a_gradient_of_booleans_picks_the_anchor_at_or_below_t() -> None:
    g = Gradient((True, False, True))
    assert [g.at(t) for t in (0.0, 0.49, 0.5, 0.99, 1.0)] == [True, True, False, False, True]


def test_the_first_filter_that_is_a_substring_of_the_name_wins() -> None:
    rules = (Filter(0.7, "mlp"), Filter(0.3, "self_attn"), Filter(Gradient((0.0, 1.0))))
    assert evaluate(rules, "model.layers.1.mlp.up_proj.weight", 0.5) == 0.7
    assert evaluate(rules, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.3
    assert evaluate(rules, "model.layers.1.input_layernorm.weight", 0.5) == 0.5  # the catch-all's gradient
    assert evaluate((Filter(1.0, "*"),), "lm_head.weight", 0.0) == 1.0
    assert evaluate((Filter(1.0, "mlp"),), "lm_head.weight", 0.0) is None  # no rule: the next source decides


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return {
        name: write_checkpoint(
            tmp_path / name,
            random_state_dict(seed, head=True, layers=LAYERS),
            dtype=torch.float32,
            num_hidden_layers=LAYERS,
        )
        for name, seed in (("base", 0), ("a", 1), ("b", 2))
    }


RECIPE = """
method = "task_arithmetic"
base = "{base}"
[[models]]
source = "{a}"
weight = [0.0, 1.0]
[[models]]
source = "{b}"
weight = [{{filter = "mlp", value = 0.25}}, {{filter = "self_attn", value = [1.0, 0.0]}}]
[parameters]
weight = 2.0
scaling_factor = [{{filter = "norm", value = 0.5}}, {{value = 1.0}}]
[output]
dir = "{out}"
"""


def _weights(name: str) -> tuple[float, float, float]:
    """(w_a, w_b, λ) the recipe above gives tensor `name`, written out by hand."""
    t = KINDS.get(name, layer_position(name, LAYERS))
    w_a = t
    w_b = 0.25 if "mlp" in name else (1.0 - t) if "self_attn" in name else 2.0  # 2.0: [parameters]
    lam = 0.5 if "norm" in name else 1.0  # input_layernorm, post_attention_layernorm, model.norm
    return w_a, w_b, lam


def test_the_plan_resolves_gradients_and_filters_for_every_kind_of_tensor(
    models: dict[str, Path], write_recipe: Callable[[str], Path], tmp_path: Path
) -> None:
    plan = build_plan(load_recipe(write_recipe(RECIPE.format(**models, out=tmp_path / "out"))))
    by_name = {t.name: t for t in plan.tensors}
    assert set(KINDS) <= set(by_name)
    for name in KINDS:
        w_a, w_b, lam = _weights(name)
        tensor = by_name[name]
        assert [m["weight"] for m in tensor.model_params] == pytest.approx([w_a, w_b]), name
        assert tensor.params["scaling_factor"] == lam, name


@pytest.mark.slow
def test_a_merge_with_schedules_equals_the_formula_with_each_tensors_values(
    models: dict[str, Path], write_recipe: Callable[[str], Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    hubmerge.merge(write_recipe(RECIPE.format(**models, out=out)), push=False)
    merged = load_file(out / "model.safetensors")
    base, a, b = (load_file(models[n] / "model.safetensors") for n in ("base", "a", "b"))
    assert set(merged) == set(base)
    for name, value in merged.items():
        w_a, w_b, lam = _weights(name)
        expected = base[name] + lam * (w_a * (a[name] - base[name]) + w_b * (b[name] - base[name]))
        torch.testing.assert_close(value, expected, rtol=0, atol=2e-7, msg=name)


def test_plan_explain_prints_each_tensors_resolved_value(
    models: dict[str, Path], write_recipe: Callable[[str], Path], tmp_path: Path
) -> None:
    result = invoke_cli(
        "plan", write_recipe(RECIPE.format(**models, out=tmp_path / "out")), "--explain", "weight"
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[1:]}
    assert rows["model.layers.1.mlp.down_proj.weight"] == ["0.5", "0.25"]
    assert rows["model.layers.2.self_attn.q_proj.weight"] == ["1", "0"]
    assert rows["lm_head.weight"] == ["0", "2"]
    bad = invoke_cli(
        "plan", write_recipe(RECIPE.format(**models, out=tmp_path / "out")), "--explain", "wieght"
    )
    assert bad.returncode == 2
    assert "did you mean 'weight'?" in bad.stderr


def test_a_filter_list_that_misses_a_tensor_falls_back_to_the_methods_default(
    models: dict[str, Path], write_recipe: Callable[[str], Path]
) -> None:
    text = f"""
method = "task_arithmetic"
base = "{models["base"]}"
models = ["{models["a"]}"]
[parameters]
scaling_factor = [{{filter = "mlp", value = 0.5}}]
"""
    by_name = {t.name: t for t in build_plan(load_recipe(write_recipe(text))).tensors}
    assert by_name["model.layers.0.mlp.up_proj.weight"].params["scaling_factor"] == 0.5
    assert by_name["model.embed_tokens.weight"].params["scaling_factor"] == 0.3  # task_arithmetic's default


def test_a_whole_model_parameter_refuses_a_gradient(write_recipe: Callable[[str], Path]) -> None:
    text = 'method = "ties"\nbase = "./b"\nmodels = ["./a"]\n[parameters]\nthreshold = [10, 20]\n'
    with pytest.raises(RecipeError, match=r"parameters\.threshold: is one value for the whole model"):
        load_recipe(write_recipe(text))
