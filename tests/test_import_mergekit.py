"""`hubmerge import-mergekit`: realistic mergekit configs become recipes `hubmerge validate` accepts, with
mergekit's values (and mergekit's defaults where ours differ); what cannot be converted is refused, one
line per YAML key, with the exact messages below.

A config whose method is not registered yet is an expected failure (strict): it turns into a hard
failure the moment the method lands without converting. tests/test_mergekit_parity.py holds the merged
numbers against mergekit's own outputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from support.checkpoints import qwen2_config

from hubmerge import cli
from hubmerge.errors import ConfigImportError, RecipeError
from hubmerge.interop.mergekit import import_mergekit
from hubmerge.merging.methods import METHODS
from hubmerge.merging.schedule import Filter, Gradient, to_json
from hubmerge.recipe.load import load_recipe, loads_recipe
from hubmerge.recipe.write import toml_value

# mergekit's method -> hubmerge's (the same name but for TIES: hubmerge's `ties` is FusionBench's).
HUBMERGE_NAME = {"ties": "mergekit_ties"}

# name -> (mergekit YAML, the recipe expected: method, base, models, [parameters], per-model parameters).
# Modelled on popular Qwen2.5 merges on the Hub.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "slerp": (
        """
        # The classic LazyMergekit SLERP: the whole-model slices form, attention and MLP gradients.
        slices:
          - sources:
              - model: Qwen/Qwen2.5-7B-Instruct
                layer_range: [0, 28]
              - model: Qwen/Qwen2.5-Math-7B-Instruct
                layer_range: [0, 28]
        merge_method: slerp
        base_model: Qwen/Qwen2.5-7B-Instruct
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.5
        dtype: bfloat16
        """,
        {
            "method": "slerp",
            "base": "Qwen/Qwen2.5-7B-Instruct",
            "models": ["Qwen/Qwen2.5-Math-7B-Instruct"],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
            "dtype": "bfloat16",
        },
    ),
    "dare_ties": (
        """
        models:
          - model: Qwen/Qwen2.5-14B
            # no parameters necessary for base model
          - model: Qwen/Qwen2.5-14B-Instruct@main
            parameters:
              density: [0.8, 0.6, 0.4]
              weight: [0.3, 0.5, 0.7]
          - model: Qwen/Qwen2.5-Coder-14B-Instruct
            parameters:
              density: 0.53
              weight:
                - filter: mlp
                  value: 0.4
                - value: 0.3
        merge_method: dare_ties
        base_model: Qwen/Qwen2.5-14B
        parameters:
          int8_mask: true
          normalize: true
        dtype: bfloat16
        tokenizer_source: base
        """,
        {
            "method": "dare_ties",
            "base": "Qwen/Qwen2.5-14B",
            "models": ["Qwen/Qwen2.5-14B-Instruct@main", "Qwen/Qwen2.5-Coder-14B-Instruct"],
            "parameters": {"normalize": True, "rescale": True, "lambda": 1.0},
            "model_params": [
                {"density": [0.8, 0.6, 0.4], "weight": [0.3, 0.5, 0.7]},
                {"density": 0.53, "weight": [{"filter": "mlp", "value": 0.4}, {"value": 0.3}]},
            ],
            "dtype": "bfloat16",
        },
    ),
    "model_stock": (
        """
        models:
          - model: Qwen/Qwen2.5-7B-Instruct
          - model: Qwen/Qwen2.5-Math-7B-Instruct
          - model: Qwen/Qwen2.5-Coder-7B-Instruct
        merge_method: model_stock
        base_model: Qwen/Qwen2.5-7B
        dtype: bfloat16
        """,
        {
            "method": "model_stock",
            "base": "Qwen/Qwen2.5-7B",
            "models": [
                "Qwen/Qwen2.5-7B-Instruct",
                "Qwen/Qwen2.5-Math-7B-Instruct",
                "Qwen/Qwen2.5-Coder-7B-Instruct",
            ],
            "parameters": {"filter_wise": False},
        },
    ),
    "della": (
        """
        merge_method: della
        base_model: Qwen/Qwen2.5-32B
        models:
          - model: Qwen/Qwen2.5-32B-Instruct
            parameters:
              weight: 0.6
              density: 0.7
              epsilon: 0.15
          - model: Qwen/Qwen2.5-Coder-32B-Instruct
            parameters:
              weight: 0.4
              density: 0.6
              epsilon: 0.1
        parameters:
          lambda: 1.1
          normalize: true
        dtype: float32
        out_dtype: bfloat16
        """,
        {
            "method": "della",
            "base": "Qwen/Qwen2.5-32B",
            "models": ["Qwen/Qwen2.5-32B-Instruct", "Qwen/Qwen2.5-Coder-32B-Instruct"],
            "parameters": {"lambda": 1.1, "normalize": True, "rescale": True},
            "model_params": [
                {"weight": 0.6, "density": 0.7, "epsilon": 0.15},
                {"weight": 0.4, "density": 0.6, "epsilon": 0.1},
            ],
            "dtype": "bfloat16",
        },
    ),
    "breadcrumbs_ties": (
        """
        models:
          - model: Qwen/Qwen2.5-7B-Instruct
            parameters:
              weight: 0.5
              density: 0.9
              gamma: 0.01
          - model: Qwen/Qwen2.5-Math-7B
            parameters:
              weight: 0.5
              density: 0.8
              gamma: 0.02
        merge_method: breadcrumbs_ties
        base_model: Qwen/Qwen2.5-7B
        dtype: bfloat16
        """,
        {
            "method": "breadcrumbs_ties",
            "base": "Qwen/Qwen2.5-7B",
            "models": ["Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-Math-7B"],
            "parameters": {"normalize": False, "rescale": False, "lambda": 1.0},
            "model_params": [
                {"weight": 0.5, "density": 0.9, "gamma": 0.01},
                {"weight": 0.5, "density": 0.8, "gamma": 0.02},
            ],
        },
    ),
    "linear": (
        """
        # Model soup of two instruct fine-tunes; the base is averaged in too (mergekit adds it).
        models:
          - model: Qwen/Qwen2.5-1.5B-Instruct
            parameters:
              weight: 0.5
          - model: Qwen/Qwen2.5-Math-1.5B-Instruct
            parameters:
              weight: 0.3
        base_model: Qwen/Qwen2.5-1.5B
        parameters:
          weight: 0.2
          normalize: true
        merge_method: linear
        dtype: float32
        out_dtype: bfloat16
        """,
        {
            "method": "linear",
            "base": "Qwen/Qwen2.5-1.5B",
            "models": ["Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-Math-1.5B-Instruct", "Qwen/Qwen2.5-1.5B"],
            "parameters": {"weight": 0.2, "normalize": True},
            "model_params": [{"weight": 0.5}, {"weight": 0.3}, {}],
            "dtype": "bfloat16",
        },
    ),
    "task_arithmetic": (
        """
        base_model: Qwen/Qwen2.5-7B
        models:
          - model: Qwen/Qwen2.5-Math-7B
            parameters:
              weight: [0.2, 0.8]
          - model: Qwen/Qwen2.5-Coder-7B
            parameters:
              weight: 0.5
        merge_method: task_arithmetic
        dtype: bfloat16
        """,
        {
            "method": "task_arithmetic",
            "base": "Qwen/Qwen2.5-7B",
            "models": ["Qwen/Qwen2.5-Math-7B", "Qwen/Qwen2.5-Coder-7B"],
            # mergekit's λ is 1.0 by default, hubmerge's 0.3: written out.
            "parameters": {"scaling_factor": 1.0},
            "model_params": [{"weight": [0.2, 0.8]}, {"weight": 0.5}],
            "dtype": "bfloat16",
        },
    ),
    "ties": (
        """
        models:
          - model: Qwen/Qwen2.5-7B
          - model: Qwen/Qwen2.5-7B-Instruct
            parameters:
              density: 0.5
              weight:
                - filter: mlp
                  value: 0.7
                - value: 0.5
          - model: Qwen/Qwen2.5-Math-7B-Instruct
            parameters:
              density: 0.5
              weight: 0.5
        merge_method: ties
        base_model: Qwen/Qwen2.5-7B
        parameters:
          normalize: true
          int8_mask: true
        dtype: bfloat16
        """,
        {
            "method": "mergekit_ties",
            "base": "Qwen/Qwen2.5-7B",
            "models": ["Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-Math-7B-Instruct"],
            "parameters": {"normalize": True, "lambda": 1.0},
            "model_params": [
                {"density": 0.5, "weight": [{"filter": "mlp", "value": 0.7}, {"value": 0.5}]},
                {"density": 0.5, "weight": 0.5},
            ],
        },
    ),
    "sce": (
        """
        merge_method: sce
        models:
          - model: Qwen/Qwen2.5-14B-Instruct
          - model: Qwen/Qwen2.5-Coder-14B-Instruct
          - model: Qwen/Qwen2.5-Math-14B-Instruct
        base_model: Qwen/Qwen2.5-14B
        parameters:
          select_topk: 0.6
        dtype: bfloat16
        """,
        {
            "method": "sce",
            "base": "Qwen/Qwen2.5-14B",
            "models": [
                "Qwen/Qwen2.5-14B-Instruct",
                "Qwen/Qwen2.5-Coder-14B-Instruct",
                "Qwen/Qwen2.5-Math-14B-Instruct",
            ],
            "parameters": {"select_topk": 0.6},
        },
    ),
    "nuslerp": (
        """
        models:
          - model: Qwen/Qwen2.5-7B-Instruct
            parameters:
              weight: 0.6
          - model: Qwen/Qwen2.5-Coder-7B-Instruct
            parameters:
              weight: 0.4
        merge_method: nuslerp
        base_model: Qwen/Qwen2.5-7B
        parameters:
          nuslerp_flatten: false
          nuslerp_row_wise: true
        dtype: bfloat16
        """,
        {
            "method": "nuslerp",
            "base": "Qwen/Qwen2.5-7B",
            "models": ["Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-Coder-7B-Instruct"],
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
            "model_params": [{"weight": 0.6}, {"weight": 0.4}],
        },
    ),
    "karcher": (
        """
        models:
          - model: Qwen/Qwen2.5-7B-Instruct
          - model: Qwen/Qwen2.5-Math-7B-Instruct
          - model: Qwen/Qwen2.5-Coder-7B-Instruct
        merge_method: karcher
        parameters:
          max_iter: 20
          tol: 1e-5   # PyYAML reads this as a string; mergekit's validation makes it a number
        dtype: bfloat16
        """,
        {
            "method": "karcher",
            "base": None,
            "models": [
                "Qwen/Qwen2.5-7B-Instruct",
                "Qwen/Qwen2.5-Math-7B-Instruct",
                "Qwen/Qwen2.5-Coder-7B-Instruct",
            ],
            "parameters": {"max_iter": 20, "tol": 1e-5},
        },
    ),
    "passthrough": (
        """
        # Rescale one model's weights (mergekit's passthrough with scale).
        models:
          - model: Qwen/Qwen2.5-0.5B-Instruct
            parameters:
              scale:
                - filter: o_proj
                  value: 0.9
                - filter: down_proj
                  value: 0.9
                - value: 1.0
        merge_method: passthrough
        dtype: bfloat16
        """,
        {
            "method": "passthrough",
            "base": None,
            "models": ["Qwen/Qwen2.5-0.5B-Instruct"],
            "model_params": [
                {
                    "scale": [
                        {"filter": "o_proj", "value": 0.9},
                        {"filter": "down_proj", "value": 0.9},
                        {"value": 1.0},
                    ]
                }
            ],
        },
    ),
    "multislerp": (
        """
        models:
          - model: Qwen/Qwen2.5-3B-Instruct
            parameters:
              weight: 1.0
          - model: Qwen/Qwen2.5-Coder-3B-Instruct
            parameters:
              weight: 0.5
        merge_method: multislerp
        base_model: Qwen/Qwen2.5-3B
        dtype: bfloat16
        """,
        {
            "method": "multislerp",
            "base": "Qwen/Qwen2.5-3B",
            "models": ["Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-Coder-3B-Instruct"],
            "model_params": [{"weight": 1.0}, {"weight": 0.5}],
        },
    ),
    "nearswap": (
        """
        slices:
          - sources:
              - model: Qwen/Qwen2.5-7B-Instruct
                layer_range: [0, 28]
              - model: Qwen/Qwen2.5-Math-7B-Instruct
                layer_range: [0, 28]
        merge_method: nearswap
        base_model: Qwen/Qwen2.5-7B-Instruct
        parameters:
          t: 0.0001
        dtype: bfloat16
        """,
        {
            "method": "nearswap",
            "base": "Qwen/Qwen2.5-7B-Instruct",
            "models": ["Qwen/Qwen2.5-Math-7B-Instruct"],
            "parameters": {"t": 0.0001},
        },
    ),
}


def hubmerge_method(config: str) -> str:
    for line in textwrap.dedent(config).splitlines():
        if line.startswith("merge_method:"):
            name = line.split(":", 1)[1].strip()
            return HUBMERGE_NAME.get(name, name)
    raise AssertionError("no merge_method")


def unregistered(name: str, config: str) -> Any:
    """The test case, marked as an expected (strict) failure while its method is not in the registry."""
    method = hubmerge_method(config)
    marks = (
        [pytest.mark.xfail(strict=True, reason=f"method {method} not registered yet")]
        if method not in METHODS
        else []
    )
    return pytest.param(name, id=name, marks=marks)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def local_model(folder: Path, layers: int = 2) -> Path:
    """A model folder as far as importing and validating go: its config.json."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(qwen2_config(num_hidden_layers=layers)))
    return folder


def recipe_view(path: Path) -> dict[str, Any]:
    """The recipe as `hubmerge validate` reads it, in the shape of CONFIGS' expectations."""
    recipe = load_recipe(path)
    declared = {p.name for p in recipe.method.params + recipe.method.model_params}
    assert set(recipe.parameters) <= declared
    return {
        "method": recipe.method.name,
        "base": recipe.base.display if recipe.base else None,
        "models": [m.display for m in recipe.models],
        "parameters": {k: to_json(v) for k, v in recipe.parameters.items()},
        "model_params": [{k: to_json(v) for k, v in m.params.items()} for m in recipe.models],
        "dtype": recipe.dtype,
    }


@pytest.mark.parametrize("name", [unregistered(n, c) for n, (c, _) in CONFIGS.items()])
def test_a_realistic_config_imports_to_a_recipe_that_validate_accepts_with_mergekits_values(
    tmp_path, capsys, name
):
    config, expected = CONFIGS[name]
    write(tmp_path, f"{name}.yml", config)
    recipe = tmp_path / f"{name}.toml"
    assert cli.main(["import-mergekit", str(tmp_path / f"{name}.yml"), "-o", str(recipe)]) == 0
    assert cli.main(["validate", str(recipe)]) == 0
    view = recipe_view(recipe)
    assert view["method"] == expected["method"]
    assert view["base"] == expected["base"]
    assert view["models"] == expected["models"]
    for key, value in expected.get("parameters", {}).items():
        hub_key = key if key in view["parameters"] else {"lambda": "scaling_factor"}[key]
        assert view["parameters"][hub_key] == value, key
    if "model_params" in expected:
        assert view["model_params"] == expected["model_params"]
    if "dtype" in expected:
        assert view["dtype"] == expected["dtype"]
    text = recipe.read_text()
    assert text.startswith(f"# Imported by `hubmerge import-mergekit` from the mergekit config {name}.yml.")
    assert f"# mergekit merge_method: {hubmerge_method(config).removeprefix('mergekit_')}" in text


def test_the_recipe_says_where_each_value_came_from_and_writes_mergekits_default_lambda(tmp_path, capsys):
    write(tmp_path, "ta.yml", CONFIGS["task_arithmetic"][0])
    imported = import_mergekit(tmp_path / "ta.yml", tmp_path / "ta.toml")
    assert imported.method == "task_arithmetic"
    lines = imported.text.splitlines()
    assert 'method = "task_arithmetic"  # mergekit merge_method: task_arithmetic' in lines
    assert 'base = "Qwen/Qwen2.5-7B"  # mergekit base_model' in lines
    assert 'dtype = "bfloat16"  # mergekit dtype' in lines
    assert "scaling_factor = 1.0  # mergekit's default for task_arithmetic (hubmerge's is 0.3)" in lines
    assert "weight = [0.2, 0.8]  # mergekit models[0].parameters.weight" in lines
    assert "[[models]]  # mergekit models[1]" in lines
    # The load dtype is bfloat16: mergekit computed in it, hubmerge computes in float32 (a note says so).
    assert imported.notes == (
        "dtype: bfloat16: mergekit casts the inputs to bfloat16 when it loads them, and every method but linear "
        "and slerp computes in it; hubmerge reads them as stored, computes in float32 and rounds once to "
        "bfloat16, so the results differ by a few bfloat16 steps at most",
    )
    assert f"#   {imported.notes[0]}" in lines


def test_int8_mask_is_dropped_with_a_printed_note_and_out_dtype_is_the_output_dtype(tmp_path, capsys):
    config = write(
        tmp_path,
        "ta.yml",
        """
        merge_method: task_arithmetic
        base_model: Qwen/Qwen2.5-7B
        models:
          - model: Qwen/Qwen2.5-7B
          - model: Qwen/Qwen2.5-Math-7B
            parameters: {weight: 1.0, int8_mask: true}
        parameters: {int8_mask: true, lambda: 0.8}
        dtype: float32
        out_dtype: float16
        """,
    )
    assert cli.main(["import-mergekit", str(config)]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"note: {config}: models[1].parameters.int8_mask: dropped: it only sets the dtype of mergekit's masks "
        "(memory), not the result",
        f"note: {config}: parameters.int8_mask: dropped: it only sets the dtype of mergekit's masks (memory), "
        "not the result",
        f"note: {config}: dtype: float32 is mergekit's load dtype; hubmerge computes in float32 always",
    ]
    assert not any(line.startswith("int8_mask") for line in out.splitlines())
    assert 'dtype = "float16"  # mergekit out_dtype' in out
    assert "scaling_factor = 0.8  # mergekit parameters.lambda" in out
    # The base, listed among mergekit's models, is hubmerge's base and not a model.
    assert out.count("[[models]]") == 1


def test_local_paths_are_relative_to_the_recipe_and_a_whole_model_slice_is_read_from_config_json(
    tmp_path, capsys, monkeypatch
):
    local_model(tmp_path / "models" / "base", layers=3)
    local_model(tmp_path / "models" / "chat", layers=3)
    config = write(
        tmp_path / "configs",
        "slerp.yml",
        """
        slices:
          - sources:
              - model: ../models/base
                layer_range: [0, 3]
              - model: ../models/chat
                layer_range: [0, 3]
            parameters:
              t: [{filter: mlp, value: 0.3}]
        merge_method: slerp
        base_model: ../models/base
        parameters:
          t: 0.5
        """,
    )
    monkeypatch.chdir(tmp_path / "configs")  # neither the YAML's folder nor the recipe's decides
    recipe = tmp_path / "recipes" / "slerp.toml"
    recipe.parent.mkdir()
    if "slerp" not in METHODS:
        pytest.xfail("method slerp not registered yet")
    imported = import_mergekit(config, recipe)
    assert imported.notes == ()
    lines = imported.text.splitlines()
    assert (
        lines[0] == "# Imported by `hubmerge import-mergekit` from the mergekit config ../configs/slerp.yml."
    )
    assert 'base = "../models/base"  # mergekit base_model' in lines
    assert 'source = "../models/chat"' in lines
    # The slice's filter first; where it matches nothing, the top-level value (mergekit's fall-through).
    assert (
        't = [{ filter = "mlp", value = 0.3 }, { value = 0.5 }]  # mergekit slices[0].parameters.t, then '
        "parameters.t" in lines
    )


def test_a_model_beside_the_config_gets_a_dot_slash_path_and_a_hub_slice_states_its_assumption(
    tmp_path, capsys
):
    local_model(tmp_path / "base")
    config = write(
        tmp_path,
        "ta.yml",
        """
        merge_method: task_arithmetic
        base_model: base
        slices:
          - sources:
              - model: base
                layer_range: [0, 2]
              - model: Qwen/Qwen2.5-Math-1.5B@0123abc
                layer_range: [0, 2]
                parameters: {weight: 0.5}
        """,
    )
    imported = import_mergekit(config, tmp_path / "out.toml")
    assert 'base = "./base"  # mergekit base_model' in imported.text
    assert 'source = "Qwen/Qwen2.5-Math-1.5B"\nrevision = "0123abc"\nweight = 0.5' in imported.text
    assert imported.notes == (
        "slices: took layer_range [0, 2] as every layer of Qwen/Qwen2.5-Math-1.5B@0123abc (Hub models, not checked "
        "offline); hubmerge merges every layer, so check the models have that many",
    )


def test_writing_refuses_an_existing_file_and_leaves_it_as_it_was(tmp_path, capsys):
    config = write(tmp_path, "ta.yml", CONFIGS["task_arithmetic"][0])
    (tmp_path / "ta.toml").write_text("mine")
    assert cli.main(["import-mergekit", str(config), "-o", str(tmp_path / "ta.toml")]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"hubmerge: error: {tmp_path / 'ta.toml'} exists; choose another -o or remove it"
    )
    assert (tmp_path / "ta.toml").read_text() == "mine"


# --- refusals: (config, lines after "hubmerge: error: {config}: ") ---------------------------------------

FRANKEN = "hubmerge merges whole models layer by layer and cannot stack, drop or mix layer ranges (a frankenmerge); merge with mergekit"
REFUSALS: dict[str, tuple[str, list[str]]] = {
    "partial slice": (
        """
        slices:
          - sources:
              - model: ./base
                layer_range: [0, 1]
              - model: ./chat
                layer_range: [0, 1]
        merge_method: linear
        parameters: {weight: 1.0}
        """,
        [
            f"slices[0].sources[0].layer_range: [0, 1] is not the whole of ./base (it has 2 layers): {FRANKEN}",
            f"slices[0].sources[1].layer_range: [0, 1] is not the whole of ./chat (it has 2 layers): {FRANKEN}",
        ],
    ),
    "layer stacking": (
        """
        slices:
          - sources:
              - model: ./base
                layer_range: [0, 2]
          - sources:
              - model: ./chat
                layer_range: [1, 2]
        merge_method: linear
        parameters: {weight: 1.0}
        """,
        [f"slices: 2 output slices: {FRANKEN}"],
    ),
    "LoRA reference": (
        """
        merge_method: linear
        models:
          - model: Qwen/Qwen2.5-7B-Instruct+someone/qwen-lora
            parameters: {weight: 1.0}
        """,
        [
            "models[0].model: 'Qwen/Qwen2.5-7B-Instruct+someone/qwen-lora' applies the LoRA adapter "
            "'someone/qwen-lora': hubmerge merges full checkpoints only; merge the adapter into "
            "'Qwen/Qwen2.5-7B-Instruct' first (peft's merge_and_unload) and name that checkpoint here"
        ],
    ),
    "MoE": (
        """
        base_model: Qwen/Qwen2.5-1.5B-Instruct
        gate_mode: hidden
        experts:
          - source_model: Qwen/Qwen2.5-Math-1.5B-Instruct
            positive_prompts: ["math"]
        """,
        [
            "is a mergekit-moe config (experts, gate_mode): hubmerge merges dense models into one of the same "
            "shape and builds no mixture of experts; use mergekit-moe"
        ],
    ),
    "modules": (
        """
        merge_method: linear
        modules:
          text_decoder:
            models:
              - model: Qwen/Qwen2.5-VL-7B-Instruct
        """,
        [
            "modules: per-module merges (vision-language and other multi-module models) cannot be converted: "
            "hubmerge merges Qwen2.5 language models as one module; use models: or merge with mergekit"
        ],
    ),
    "tokenizer tokens and padding": (
        """
        merge_method: linear
        models:
          - model: Qwen/Qwen2.5-7B-Instruct
            parameters: {weight: 1.0}
        tokenizer:
          source: union
          tokens:
            <|im_start|>:
              source: Qwen/Qwen2.5-7B-Instruct
          pad_to_multiple_of: 64
        """,
        [
            "tokenizer.tokens: per-token embedding sources cannot be converted: hubmerge merges the embeddings "
            "row by row as they are and builds no new tokens; remove it, or merge with mergekit",
            "tokenizer.pad_to_multiple_of: cannot be converted: hubmerge keeps the embeddings' shape (the "
            "sources' vocab_size) and does not pad them; remove it, or merge with mergekit",
        ],
    ),
    "unknown parameters": (
        """
        merge_method: linear
        models:
          - model: Qwen/Qwen2.5-7B-Instruct
            parameters: {weigth: 1.0}
        parameters: {weight: 1.0, t: 0.5}
        """,
        [
            "models[0].parameters.weigth: linear has no parameter 'weigth' (mergekit ignores it; its "
            "parameters: normalize, weight); did you mean 'weight'? remove it",
            "parameters.t: linear has no parameter 't' (mergekit ignores it; its parameters: normalize, "
            "weight); remove it",
        ],
    ),
    "missing required weight": (
        """
        merge_method: linear
        base_model: Qwen/Qwen2.5-7B
        models:
          - model: Qwen/Qwen2.5-7B-Instruct
            parameters: {weight: 1.0}
          - model: Qwen/Qwen2.5-Math-7B
        """,
        [
            "models[1].parameters.weight: is required by mergekit's linear for every model; give one here or "
            "a default in parameters",
            "base_model: has no weight, which mergekit's linear requires of every input (it adds the base to "
            "them): give a default weight in parameters, or list the base under models with one",
        ],
    ),
    "chat template": (
        """
        merge_method: linear
        models:
          - model: Qwen/Qwen2.5-7B-Instruct
            parameters: {weight: 1.0}
        chat_template: chatml
        """,
        [
            "chat_template: hubmerge sets no chat template of its own: it copies the tokenizer source's; set "
            "tokenizer_source to a model with the template you want and remove chat_template (Qwen2.5 "
            "instruct models' templates are ChatML)"
        ],
    ),
    "float64 output": (
        """
        merge_method: linear
        models:
          - model: Qwen/Qwen2.5-7B-Instruct
            parameters: {weight: 1.0}
        out_dtype: float64
        """,
        ["out_dtype: hubmerge writes bfloat16, float16 or float32, not float64"],
    ),
    "unknown key, duplicate model, local revision": (
        """
        merge_method: linear
        base_modle: Qwen/Qwen2.5-7B
        models:
          - model: Qwen/Qwen2.5-7B-Instruct
            parameters: {weight: 1.0}
          - model: Qwen/Qwen2.5-7B-Instruct
            parameters: {weight: 2.0}
          - model: ./base@v1
            parameters: {weight: 2.0}
        """,
        [
            "base_modle: is not a mergekit config key (mergekit ignores it); did you mean 'base_model'? "
            "Remove or fix it",
            "models[2].model: './base@v1' is a local folder; a revision applies to Hub models only: drop '@v1'",
            "models[1].model: Qwen/Qwen2.5-7B-Instruct is already models[0]; mergekit refuses duplicate inputs",
        ],
    ),
    "unknown method": (
        """
        merge_method: dare-ties
        models:
          - model: Qwen/Qwen2.5-7B-Instruct
        """,
        ["merge_method: 'dare-ties' is not a mergekit 0.1.5 method; did you mean 'dare_ties'?"],
    ),
    "a merge only hubmerge refuses": (
        """
        merge_method: linear
        models:
          - model: Qwen/Qwen2.5-7B-Instruct
            parameters: {weight: 1.0}
          - model: Qwen/Qwen2.5-Math-7B
            parameters: {weight: -1.0}
        """,
        [
            "the converted recipe is not valid: models: the weights sum to 0 (1.0 + -1.0); linear divides by "
            "their sum"
        ],
    ),
    "multi-document": (
        """
        name: first
        merge_method: linear
        models: [{model: a/b, parameters: {weight: 1.0}}]
        ---
        name: second
        merge_method: linear
        models: [{model: a/c, parameters: {weight: 1.0}}]
        """,
        [
            "holds 2 YAML documents (a mergekit-multi config); put each merge in a file of its own and import "
            "each"
        ],
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_what_cannot_be_converted_is_refused_one_line_per_key_and_nothing_is_written(tmp_path, capsys, case):
    local_model(tmp_path / "base")
    local_model(tmp_path / "chat")
    text, lines = REFUSALS[case]
    config = write(tmp_path, "config.yml", text)
    assert cli.main(["import-mergekit", str(config), "-o", str(tmp_path / "out.toml")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("hubmerge: error:")] == [
        f"hubmerge: error: {config}: {line}" for line in lines
    ]
    assert not (tmp_path / "out.toml").exists()
    with pytest.raises(ConfigImportError) as caught:
        import_mergekit(config)
    assert caught.value.problems == tuple(f"{config}: {line}" for line in lines)


def test_references_are_read_by_the_recipe_s_parser_a_refused_path_is_one_line_not_an_internal_error(
    tmp_path, capsys
):
    config = write(
        tmp_path,
        "config.yml",
        """
        merge_method: linear
        models:
          - model: "~no-such-user-hubmerge/x"
            parameters: {weight: 1.0}
          - model: "./a\\0b"
            parameters: {weight: 1.0}
          - model: "not a hub id!"
            parameters: {weight: 1.0}
        """,
    )
    assert cli.main(["import-mergekit", str(config), "-o", str(tmp_path / "out.toml")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" (", 1)[0] for line in err] == [
        f"hubmerge: error: {config}: models[0].model: '~no-such-user-hubmerge/x' is not a usable path",
        f"hubmerge: error: {config}: models[1].model: './a\\x00b' is not a usable path",
        f"hubmerge: error: {config}: models[2].model: 'not a hub id!' is neither an existing folder",
    ]
    assert err[2].endswith(f'(relative to {tmp_path.resolve()}) nor a Hub id like "org/name[@revision]"')
    assert not (tmp_path / "out.toml").exists()


def test_bad_yaml_is_one_line_with_line_and_column(tmp_path, capsys):
    config = write(tmp_path, "bad.yml", "merge_method: linear\nmodels:\n  - model: a/b\n   parameters: [\n")
    assert cli.main(["import-mergekit", str(config)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"hubmerge: error: {config}:4:4: YAML syntax error: expected <block end>, but found '<block mapping "
        "start>' (while parsing a block collection)"
    ]


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just text\n"])
def test_a_file_that_is_not_a_yaml_mapping_is_not_a_mergekit_config(tmp_path, capsys, text):
    config = write(tmp_path, "x.yml", text)
    assert cli.main(["import-mergekit", str(config)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"hubmerge: error: {config}: is not a mergekit config (a YAML mapping with merge_method and models)"
    ]


def test_a_recipe_path_given_to_validate_as_yaml_points_to_the_importer(tmp_path, capsys):
    config = write(tmp_path, "merge.yml", CONFIGS["linear"][0])
    assert cli.main(["validate", str(config)]) == 2
    assert "convert a mergekit config with `hubmerge import-mergekit CONFIG.yml -o recipe.toml`" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("plain", '"plain"'),
        ('say "hi"', r'"say \"hi\""'),
        ("back\\slash", r'"back\\slash"'),
        ("line\nbreak\ttab", '"line\\nbreak\ttab"'),  # tomli-w leaves a tab as it is
        ("bell\x07 del\x7f", r'"bell\u0007 del\u007f"'),
        ("θ 日本", '"θ 日本"'),
    ],
)
def test_toml_strings_round_trip_through_tomllib(text, quoted):
    from hubmerge.recipe.load import tomllib

    assert toml_value(text) == quoted
    assert tomllib.loads(f"x = {quoted}")["x"] == text


@pytest.mark.slow
def test_importing_loads_no_torch(tmp_path):
    """Like `validate`, the importer reads no weights: it must not pay for importing torch."""
    config = write(tmp_path, "ta.yml", CONFIGS["task_arithmetic"][0])
    code = (
        "import sys; from hubmerge import cli; "
        f"assert cli.main(['import-mergekit', {str(config)!r}]) == 0; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# Imported by `hubmerge import-mergekit`")


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (1e-05, "1e-05"),
        (1e16, "1e+16"),
        (0.1, "0.1"),
        (2.0, "2.0"),
        (3, "3"),
        (True, "true"),
        ([0, 0.5], "[0, 0.5]"),
    ],
)
def test_toml_values_read_back_as_written(value, written):
    from hubmerge.recipe.load import tomllib

    assert toml_value(value) == written
    assert tomllib.loads(f"x = {written}")["x"] == value


# --- settings: the importer reads them with the recipe's parser ------------------------------------------

# mergekit method -> (YAML before `parameters:`, the recipe's TOML before `[parameters]`, after it).
SETTING_CONFIGS = {
    "dare_ties": (
        "merge_method: dare_ties\nbase_model: a/base\nmodels:\n"
        "  - {model: a/x, parameters: {weight: 1.0, density: 0.5}}\n",
        'method = "dare_ties"\nbase = "a/base"\n',
        '[[models]]\nsource = "a/x"\nweight = 1.0\ndensity = 0.5\n',
    ),
    "nuslerp": (
        "merge_method: nuslerp\nbase_model: a/base\nmodels:\n"
        "  - {model: a/x, parameters: {weight: 0.5}}\n  - {model: a/y, parameters: {weight: 0.5}}\n",
        'method = "nuslerp"\nbase = "a/base"\n',
        '[[models]]\nsource = "a/x"\nweight = 0.5\n[[models]]\nsource = "a/y"\nweight = 0.5\n',
    ),
}


def import_and_load(tmp_path: Path, method: str, name: str, value: Any) -> tuple[Any, Any]:
    """The same setting of `name` given to the importer (in YAML) and to a recipe (in TOML): what each makes
    of it, a setting or the one-line refusal after the file name (`parameters.density: ...`)."""
    yaml_head, toml_head, toml_tail = SETTING_CONFIGS[method]
    config = write(tmp_path, "config.yml", f"{yaml_head}parameters:\n  {name}: {json.dumps(value)}\n")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f"{toml_head}[parameters]\n{name} = {toml_value(value)}\n{toml_tail}")
    try:
        imported: Any = import_mergekit(config, recipe)
    except ConfigImportError as exc:
        assert len(exc.problems) == 1, exc.problems
        imported = exc.problems[0].removeprefix(f"{config}: ")
    try:
        loaded: Any = load_recipe(recipe).parameters[name]
    except RecipeError as exc:
        loaded = str(exc).removeprefix(f"{recipe}: ")
    return imported, loaded


@pytest.mark.parametrize(
    ("method", "name", "value", "reason"),
    [
        ("dare_ties", "density", 1.5, "parameters.density: must be <= 1.0, got 1.5"),
        ("dare_ties", "density", [0.5, 2], "parameters.density[1]: must be <= 1.0, got 2"),
        ("dare_ties", "density", [], "parameters.density: is an empty list; give a value, a gradient"),
        (
            "dare_ties",
            "density",
            [0.5, [1]],
            "parameters.density: must be a value, a gradient [a, b, ...] or",
        ),
        ("dare_ties", "density", "dense", "parameters.density: must be a number, got 'dense'"),
        ("dare_ties", "density", True, "parameters.density: must be a number, got True"),
        (
            "dare_ties",
            "density",
            [{"filter": "mlp", "value": [[0.5]]}],
            "parameters.density[0].value: must be a value or a gradient [a, b, ...], got [[0.5]]",
        ),
        ("dare_ties", "density", [{"filter": "mlp"}], "parameters.density[0].value: is required"),
        (
            "dare_ties",
            "density",
            [{"fliter": "mlp", "value": 0.5}],
            "parameters.density[0].fliter: unknown key; did you mean 'filter'?",
        ),
        (
            "dare_ties",
            "density",
            [{"filter": 3, "value": 0.5}],
            "parameters.density[0].filter: must be a string",
        ),
        (
            "nuslerp",
            "nuslerp_flatten",
            [True, False],
            "parameters.nuslerp_flatten: is one value for the whole model: a gradient or a filter list is not "
            "allowed here",
        ),
    ],
)
def test_a_setting_the_recipe_refuses_the_importer_refuses_with_the_same_key_and_reason(
    tmp_path, method, name, value, reason
):
    imported, loaded = import_and_load(tmp_path, method, name, value)
    assert imported == loaded
    assert imported.startswith(reason)


@pytest.mark.parametrize(
    "value",
    [
        0.5,
        1,
        [0, 0.5, 1],
        [{"filter": "mlp", "value": [0, 1]}, {"filter": "*", "value": 0.25}],
        [{"value": 1}],
    ],
)
def test_a_setting_the_recipe_accepts_the_importer_reads_as_the_same_value_and_writes_it_as_read(
    tmp_path, value
):
    imported, loaded = import_and_load(tmp_path, "dare_ties", "density", value)
    line = f"density = {toml_value(to_json(loaded))}  # mergekit parameters.density"
    # The importer's own reading, written out: numbers as the recipe reads them (floats for density).
    assert line in imported.text.splitlines()
    assert loads_recipe(imported.text, tmp_path / "recipe.toml").parameters["density"] == loaded


def test_yaml_s_own_readings_are_taken_as_mergekit_takes_them_before_the_recipe_s_parser(tmp_path):
    """A number PyYAML reads as a string (1e-1) is a number, `filter: null` is no filter, and a single
    {filter, value} mapping is a list of one; a refusal inside that mapping names the key as the YAML wrote it
    (no [0])."""
    config = write(
        tmp_path,
        "config.yml",
        f"{SETTING_CONFIGS['dare_ties'][0]}parameters:\n  density: {{filter: mlp, value: [1e-1, '2.5e-1']}}\n"
        "  lambda: {filter: null, value: 1e-1}\n",
    )
    imported = import_mergekit(config, tmp_path / "recipe.toml")
    recipe = loads_recipe(imported.text, tmp_path / "recipe.toml")
    assert recipe.parameters["density"] == (Filter(Gradient((0.1, 0.25)), "mlp"),)
    assert recipe.parameters["lambda"] == (Filter(0.1),)
    config.write_text(config.read_text().replace("'2.5e-1'", "'2.5e+1'"))
    with pytest.raises(ConfigImportError) as caught:
        import_mergekit(config, tmp_path / "recipe.toml")
    assert caught.value.problems == (f"{config}: parameters.density.value[1]: must be <= 1.0, got 25.0",)
