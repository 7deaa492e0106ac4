"""hubmerge against mergekit 0.1.5's own outputs for the deterministic task-vector methods.

The fixtures (tests/mergekit/README.md) hold mergekit's merges of tiny checkpoints; each config here is
turned into the equivalent recipe (`ties` is hubmerge's `mergekit_ties`; `lambda` is `task_arithmetic`'s
`scaling_factor`; `int8_mask` only changes mergekit's mask dtype) and merged by hubmerge.

Where mergekit computes in float32 (`dtype: float32`, or float32 inputs without a dtype) the outputs are
identical, bit for bit, except where a magnitude cut-off falls on equal magnitudes: mergekit's unstable
argsort keeps an unspecified subset of them, hubmerge keeps them all (`methods/_gta.py`). Those
positions are named exactly (`tied_at_cut`) and excluded; with bf16 inputs they are a few hundred of
~20k per run, with float32 inputs almost none.

Runs where mergekit computes in bfloat16 (`dtype: bfloat16`, or bf16 inputs without a dtype) are not
compared: mergekit rounds every step (task vectors, weights, sign sums) to bfloat16, hubmerge computes
in float32 and rounds once, so they differ by design (measured: task_arithmetic up to 4.9e-4 on bf16
inputs and 7.8e-3 on float32 ones; TIES up to 0.07, its bf16 cut-offs falling on many more ties).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from support.toml_text import toml_value

import hubmerge
from hubmerge.merging.schedule import evaluate, layer_position

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "tests" / "mergekit" / "manifest.json"
METHODS = {"ties": "mergekit_ties"}  # mergekit's name -> hubmerge's, where they differ
GTA = ("ties", "task_arithmetic", "breadcrumbs", "breadcrumbs_ties")
LAYERS = 3


def runs() -> list[dict[str, Any]]:
    """The deterministic GTA runs that mergekit computed in float32."""
    manifest = json.loads(MANIFEST.read_text())
    return [
        r
        for r in manifest["runs"]
        if r["deterministic"]
        and r["merge_method"] in GTA
        and computes_in_float32(yaml.safe_load((REPO / r["config"]).read_text()), r["input_set"])
    ]


def recipe(config: dict[str, Any], models: Path) -> str:
    method = config["merge_method"]
    text = f'method = "{METHODS.get(method, method)}"\nbase = "{models / config["base_model"]}"\n'
    if config.get("out_dtype") or config.get("dtype"):
        text += f'dtype = "{config.get("out_dtype") or config["dtype"]}"\n'
    for entry in config["models"]:
        if entry["model"] == config["base_model"]:
            continue
        text += f'[[models]]\nsource = "{models / entry["model"]}"\n'
        text += "".join(f"{k} = {toml_value(v)}\n" for k, v in entry.get("parameters", {}).items())
    parameters = {k: v for k, v in config.get("parameters", {}).items() if k != "int8_mask"}
    if method == "task_arithmetic":  # λ is scaling_factor there, and mergekit's default is 1
        parameters["scaling_factor"] = parameters.pop("lambda", 1.0)
    text += "[parameters]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in parameters.items())
    return text


def computes_in_float32(config: dict[str, Any], input_set: str) -> bool:
    dtype = config.get("dtype")
    return dtype == "float32" or (dtype is None and input_set.startswith("f32"))


def tied_at_cut(
    config: dict[str, Any], name: str, inputs: dict[str, dict[str, torch.Tensor]]
) -> torch.Tensor:
    """Positions where some model's magnitude equals one of its cut-offs shared by more entries than the
    cut needs: there mergekit's unstable sort chose which to keep."""
    base = inputs[config["base_model"]][name].float()
    t = layer_position(name, LAYERS)
    doubtful = torch.zeros(base.shape, dtype=torch.bool)
    for entry in config["models"]:
        if entry["model"] == config["base_model"]:
            continue
        params = {**config.get("parameters", {}), **entry.get("parameters", {})}
        density = float(evaluate(_setting(params.get("density", 1.0)), name, t) or 1.0)
        if density >= 1:
            continue
        magnitude = (inputs[entry["model"]][name].float() - base).abs()
        ordered = magnitude.flatten().sort(descending=True).values
        n = magnitude.numel()
        if config["merge_method"] in ("breadcrumbs", "breadcrumbs_ties"):
            gamma = float(evaluate(_setting(params.get("gamma", 0.01)), name, t) or 0.01)
            target = int(density * n)
            bottom = max(0, n - target - int(gamma * n))
            ascending = ordered.flip(0)
            cuts = [ascending[bottom], ascending[bottom + target - 1]] if target else []
            cuts += [ascending[bottom - 1]] if bottom else []
            cuts += [ascending[bottom + target]] if bottom + target < n else []
        else:
            k = max(1, int(density * n))
            cuts = [ordered[k - 1]] + ([ordered[k]] if k < n else [])
        for cut in {float(c) for c in cuts}:
            if cut > 0 and int((magnitude == cut).sum()) > 1:
                doubtful |= magnitude == cut
    return doubtful


def _setting(value: Any) -> Any:
    """A YAML setting as hubmerge's schedule types, for `evaluate`."""
    from hubmerge.merging.schedule import Filter, Gradient

    if isinstance(value, list) and value and isinstance(value[0], dict):
        return tuple(Filter(_setting(r["value"]), r.get("filter")) for r in value)
    if isinstance(value, list):
        return Gradient(tuple(value))
    return value


@pytest.mark.slow
@pytest.mark.parametrize("run", runs(), ids=lambda r: r["name"])
def test_matches_mergekit(tmp_path, run):
    config = yaml.safe_load((REPO / run["config"]).read_text())
    models = REPO / run["cwd"]
    path = tmp_path / "recipe.toml"
    path.write_text(recipe(config, models) + '[output]\ndir = "out"\n[card]\nlicense = "apache-2.0"\n')
    result = hubmerge.merge(path, push=False, quiet=True, stats=False, sanity=False, log=lambda _: None)
    got = load_file(result.output_dir / "model.safetensors")
    want = load_file(REPO / run["output"] / "model.safetensors")
    assert sorted(got) == sorted(want)
    inputs = {p.name: load_file(p / "model.safetensors") for p in models.iterdir() if p.is_dir()}
    doubtful_total = 0
    for name, w in want.items():
        assert got[name].dtype == w.dtype, name
        diff = (got[name].float() - w.float()).abs()
        doubtful = tied_at_cut(config, name, inputs)
        assert not (diff[~doubtful] > 0).any(), (name, float(diff[~doubtful].max()))
        doubtful_total += int(doubtful.sum())
    assert doubtful_total < 0.03 * sum(w.numel() for w in want.values())


def random_runs() -> list[dict[str, Any]]:
    manifest = json.loads(MANIFEST.read_text())
    return [
        r
        for r in manifest["runs"]
        if r["merge_method"] in ("dare_linear", "della_linear") and r["input_set"] == "f32-tied"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("run", random_runs(), ids=lambda r: r["name"])
def test_random_masks_match_mergekits_statistics(tmp_path, run):
    """mergekit draws its masks from torch's global RNG, hubmerge from `uniform`: the values differ, the
    statistics must not. Without a sign election every position is base + Σ wᵢ·rᵢ·mᵢ·τᵢ, so the share
    left at the base (every model dropped there) and the L1 norm of the change agree within their
    sampling error."""
    config = yaml.safe_load((REPO / run["config"]).read_text())
    models = REPO / run["cwd"]
    path = tmp_path / "recipe.toml"
    path.write_text(recipe(config, models) + '[output]\ndir = "out"\n[card]\nlicense = "apache-2.0"\n')
    result = hubmerge.merge(path, push=False, quiet=True, stats=False, sanity=False, log=lambda _: None)
    got = load_file(result.output_dir / "model.safetensors")
    want = load_file(REPO / run["output"] / "model.safetensors")
    base = load_file(models / config["base_model"] / "model.safetensors")
    n = sum(t.numel() for t in want.values())

    def unchanged(out: dict[str, torch.Tensor]) -> float:
        return sum(int((out[k].float() == base[k].to(out[k].dtype).float()).sum()) for k in out) / n

    def change(out: dict[str, torch.Tensor]) -> float:
        return sum(float((out[k].float() - base[k].float()).abs().sum()) for k in out)

    ours, theirs = unchanged(got), unchanged(want)
    assert abs(ours - theirs) < 5 * (2 * theirs * (1 - theirs) / n) ** 0.5, (ours, theirs)
    assert change(got) == pytest.approx(change(want), rel=0.03)
