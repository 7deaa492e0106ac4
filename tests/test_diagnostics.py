"""Merge diagnostics: the numbers against direct computations on the full tensors, slice-size independence,
the plots and the card, `hubmerge inspect`, and the switches that turn the diagnostics off."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from support.checkpoints import TINY, random_state_dict, write_checkpoint
from support.cli import invoke_cli

import hubmerge.merging.plan
from hubmerge import api
from hubmerge.errors import RecipeError
from hubmerge.quality.diagnostics import PLOTS, STATS_FILE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOT_FILES = [file for file, _ in PLOTS.values()]
MODELS = ("math", "coder", "instruct")


def recipe_text(method: str, base: bool = True, extra: str = "") -> str:
    models = ", ".join(f'"{TINY / m}"' for m in MODELS)
    head = (
        f'method = "{method}"\n' + (f'base = "{TINY / "base"}"\n' if base else "") + f"models = [{models}]\n"
    )
    if method == "ties":
        head += "[parameters]\nscaling_factor = 0.8\nthreshold = 20\n"
    return head + extra


def task_vectors() -> dict[str, torch.Tensor]:
    """name → (3, numel) float32 task vectors of the tiny models, from whole tensors (the models are tied)."""
    base = load_file(TINY / "base" / "model.safetensors")
    models = [load_file(TINY / m / "model.safetensors") for m in MODELS]
    return {
        name: torch.stack([(m[name].float() - b.float()).flatten() for m in models])
        for name, b in sorted(base.items())
    }


def direct(tv: torch.Tensor) -> dict[str, Any]:
    """The statistics of one group of task vectors (3, numel), computed at once in float64."""
    t = tv.double()
    norm = t.norm(dim=1)
    positive, negative = tv > 0, tv < 0
    any_positive, any_negative = positive.any(0), negative.any(0)
    return {
        "norm": norm,
        "cosine": (t @ t.T) / torch.outer(norm, norm),
        "sign_conflict": (any_positive & any_negative).double().mean(),
        "model_conflict": ((positive & any_negative) | (negative & any_positive)).double().mean(dim=1),
    }


def ties_direct(
    tvs: dict[str, torch.Tensor], threshold: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name → (kept, dropped) counts per model, FusionBench's TIES done on the whole model at once."""
    flat = torch.cat(list(tvs.values()), dim=1)
    d = flat.shape[1]
    k = d - int(d * threshold / 100)  # FusionBench's topk_values_mask: the k-th smallest magnitude stays
    cuts = flat.abs().kthvalue(k, dim=1).values[:, None]
    keep = {name: (tv.abs() >= cuts) & (tv != 0) for name, tv in tvs.items()}
    elected = {name: torch.sign(torch.where(keep[name], tv, 0).sum(0)) for name, tv in tvs.items()}
    majority = torch.sign(torch.cat(list(elected.values())).sum())
    result = {}
    for name, tv in tvs.items():
        final = torch.where(elected[name] == 0, majority, elected[name])
        selected = torch.where(
            final > 0, tv > 0, tv < 0
        )  # FusionBench: a 0 majority keeps the negative entries
        result[name] = (keep[name].sum(1), (keep[name] & ~selected).sum(1))
    return result


def assert_group(found: dict[str, Any], expected: dict[str, Any], numel: int) -> None:
    assert found["numel"] == numel
    assert found["norm"] == pytest.approx(expected["norm"].tolist(), rel=1e-6)
    assert found["cosine"] == [pytest.approx(row, rel=1e-6, abs=1e-9) for row in expected["cosine"].tolist()]
    assert found["sign_conflict"] == pytest.approx(float(expected["sign_conflict"]), abs=1e-6)
    assert found["model_conflict"] == pytest.approx(expected["model_conflict"].tolist(), abs=1e-6)


@pytest.mark.slow
def test_ties_stats_match_direct_computations_on_the_full_tensors(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text("ties"))
    stats = api.inspect(recipe, output_dir=tmp_path / "inspect", quiet=True).stats
    tvs = task_vectors()
    ties = ties_direct(tvs, 20.0)

    assert sorted(t["name"] for t in stats["tensors"]) == sorted(tvs)
    for entry in stats["tensors"]:
        tv = tvs[entry["name"]]
        assert_group(entry, direct(tv), tv.shape[1])
        kept, dropped = ties[entry["name"]]
        assert entry["kept"] == pytest.approx((kept / tv.shape[1]).tolist(), abs=1e-6)
        assert entry["dropped"] == pytest.approx((dropped / tv.shape[1]).tolist(), abs=1e-6)
    # Something to measure: trimming keeps about 20 % of each model and the elected sign drops some of it.
    assert stats["total"]["kept"] == pytest.approx([0.2, 0.2, 0.2], abs=0.002)
    assert all(0 < share < 0.05 for share in stats["total"]["dropped"])

    for layer in stats["layers"]:
        names = [n for n in tvs if n.startswith(f"model.layers.{layer['layer']}.")]
        tv = torch.cat([tvs[n] for n in names], dim=1)
        assert_group(layer, direct(tv), tv.shape[1])
    everything = torch.cat(list(tvs.values()), dim=1)
    assert_group(stats["total"], direct(everything), everything.shape[1])
    kept = sum(ties[n][0] for n in tvs)
    assert stats["total"]["kept"] == pytest.approx((kept / everything.shape[1]).tolist(), abs=1e-6)


@pytest.mark.slow
def test_stats_are_the_same_whatever_the_slice_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A pool a fifth of the tiny demo's size (one layer, hidden 48, vocab 64): 37-element slices still cut
    # every tensor, 1-D ones included, in ~500 slices per model rather than ~3,000.
    small = {"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 1, "vocab_size": 64}
    for seed, name in enumerate(("base", *MODELS)):
        sd = random_state_dict(seed, vocab=64, layers=1, hidden=48, intermediate=64)
        write_checkpoint(tmp_path / name, sd, **small)  # type: ignore[arg-type]
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text("ties").replace(str(TINY), str(tmp_path)))
    whole = api.inspect(recipe, output_dir=tmp_path / "a", quiet=True).stats
    monkeypatch.setattr(hubmerge.merging.plan, "CHUNK_ELEMENTS", 37)  # a few rows, or part of one, per slice
    plan = api.load_plan(recipe)
    assert max(t.chunk_rows for t in plan.tensors) == 37  # the 1-D tensors split too
    assert any(t.numel > t.chunk_rows * (t.numel // t.shape[0]) for t in plan.tensors)
    sliced = api.inspect(recipe, output_dir=tmp_path / "b", quiet=True).stats

    assert_same(whole, sliced)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Shares of counted positions equal exactly; norms and cosines (float64 sums) up to the order of additions."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and (".norm" in where or ".cosine" in where):
        assert b == pytest.approx(a, rel=1e-12, abs=1e-15), where
    else:
        assert a == b, where


@pytest.mark.slow
def test_merge_writes_png_plots_that_the_card_shows_and_the_lock_records(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text("ties"))
    result = api.merge(recipe, output_dir=tmp_path / "out", push=False, quiet=True)
    out = result.output_dir
    card = (out / "README.md").read_text()
    lock = json.loads((out / "hubmerge.lock.json").read_text())
    assert "## Merge diagnostics" in card
    for file in PLOT_FILES:
        data = (out / file).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
        with Image.open(out / file) as image:
            image.load()
            assert image.format == "PNG" and image.width == 800 and image.height >= 300
        assert f"]({file})" in card  # a relative link: the image is pushed with the folder
        assert file in result.files and file in lock["output"]["files"]
    stats = json.loads((out / STATS_FILE).read_text())
    assert stats == result.stats and stats["plots"] == PLOT_FILES
    # The card's table has the numbers of merge_stats.json, one row per model in the sources' order.
    total = stats["total"]
    for i, model in enumerate(MODELS):
        row = next(line for line in card.splitlines() if line.startswith(f"| `{model}` |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{total['norm'][i]:.4g}"
        assert cells[4] == f"{100 * total['model_conflict'][i]:.2f}%"
        assert cells[5] == f"{100 * total['kept'][i]:.2f}%"
        assert cells[6] == f"{100 * total['dropped'][i]:.2f}%"


@pytest.mark.slow
def test_inspect_writes_the_merges_numbers_and_plots_and_no_model_files(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text("ties", extra='[output]\ndir = "merged"\n'))
    merged = api.merge(recipe, push=False, quiet=True)
    assert merged.output_dir == tmp_path / "merged"

    shown = invoke_cli("inspect", recipe)
    assert shown.returncode == 0, shown.stderr
    inspected = tmp_path / "merged-inspect"  # the default folder: beside the output, never inside it
    assert sorted(p.name for p in inspected.iterdir()) == sorted([STATS_FILE, *PLOT_FILES])
    for file in [STATS_FILE, *PLOT_FILES]:  # the same bytes: the same numbers, deterministic PNGs
        assert (inspected / file).read_bytes() == (merged.output_dir / file).read_bytes(), file
    stats = json.loads((inspected / STATS_FILE).read_text())
    first = stats["models"][0]
    assert f"{stats['total']['norm'][0]:.4g}" in next(
        line for line in shown.stdout.splitlines() if first in line
    )
    assert f"{100 * stats['total']['sign_conflict']:.2f}%" in shown.stdout
    assert str(inspected) in shown.stdout


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simple_average", "linear"])
def test_methods_without_a_base_in_their_math_measure_against_the_recipes_base(
    tmp_path: Path, method: str
) -> None:
    stats = {}
    for name in (method, "task_arithmetic"):
        recipe = tmp_path / f"{name}.toml"
        recipe.write_text(recipe_text(name))
        stats[name] = api.inspect(recipe, output_dir=tmp_path / name, quiet=True).stats
    assert stats[method]["reference"] == "base"
    assert stats[method]["tensors"] == stats["task_arithmetic"]["tensors"]
    assert "kept" not in stats[method]["total"]


def test_without_a_base_the_stats_say_not_applicable(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text("simple_average", base=False))
    result = api.merge(recipe, output_dir=tmp_path / "out", push=False, quiet=True)
    stats = json.loads((result.output_dir / STATS_FILE).read_text())
    assert stats["reference"] is None and "no base" in stats["note"]
    assert "tensors" not in stats and stats["plots"] == []
    assert not any((result.output_dir / file).exists() for file in PLOT_FILES)
    assert f"Merge diagnostics: {stats['note']}." in (result.output_dir / "README.md").read_text()


def test_without_matplotlib_the_json_and_the_terminal_say_why_there_are_no_plots_and_the_card_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without the extra sees
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text("task_arithmetic"))
    said: list[str] = []
    result = api.merge(recipe, output_dir=tmp_path / "out", push=False, quiet=True, log=said.append)
    stats = json.loads((result.output_dir / STATS_FILE).read_text())
    assert stats["plots"] == [] and "hubmerge[plots]" in stats["plots_note"]
    assert stats["plots_note"] in said  # the person who merged learns how to get the plots
    assert not any((result.output_dir / file).exists() for file in PLOT_FILES)
    card = (result.output_dir / "README.md").read_text()
    # The public card describes the model, not the merging machine's missing extra.
    assert "## Merge diagnostics" in card and "![" not in card
    assert "matplotlib" not in card and "plots" not in card.split("## Merge diagnostics")[1].split("\n## ")[0]
    assert math.isfinite(stats["total"]["norm"][0]) and stats["total"]["norm"][0] > 0


@pytest.mark.slow
def test_no_stats_flag_and_recipe_switch_turn_the_diagnostics_off(
    tmp_path: Path, write_recipe: Callable[[str], Path]
) -> None:
    off = write_recipe(recipe_text("ties", extra="[output]\nstats = false\n"), "off.toml")
    result = api.merge(off, output_dir=tmp_path / "a", push=False, quiet=True)
    assert result.stats is None and not (result.output_dir / STATS_FILE).exists()
    assert "Merge diagnostics" not in (result.output_dir / "README.md").read_text()

    on = write_recipe(recipe_text("simple_average"), "on.toml")
    flagged = invoke_cli(on, "--output", tmp_path / "b", "--no-stats", "-q")
    assert flagged.returncode == 0, flagged.stderr
    assert (tmp_path / "b" / "model.safetensors").is_file()
    assert not any((tmp_path / "b" / file).exists() for file in [STATS_FILE, *PLOT_FILES])

    wrong = write_recipe(recipe_text("ties", extra='[output]\nstats = "no"\n'), "wrong.toml")
    with pytest.raises(RecipeError, match=r"output\.stats: must be a bool"):
        api.load_plan(wrong)


@pytest.mark.slow
def test_ties_dropped_share_follows_the_majority_sign_where_trimmed_vectors_cancel(tmp_path: Path) -> None:
    # Where the trimmed task vectors sum to exactly 0, the model-wide majority sign (here -1) decides.
    base = {k: torch.zeros_like(v) for k, v in random_state_dict(0).items()}
    a = {k: torch.full_like(v, -1.0) for k, v in base.items()}
    b = {k: torch.full_like(v, -1.0) for k, v in base.items()}
    a["model.norm.weight"][:4] = torch.tensor([2.0, -2.0, 3.0, 4.0])
    b["model.norm.weight"][:4] = torch.tensor([-2.0, 2.0, -3.0, 4.0])  # cancels at positions 0, 1 and 2
    for name, sd in (("base", base), ("a", a), ("b", b)):
        write_checkpoint(tmp_path / name, sd, dtype=torch.float32)
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        'method = "ties"\nbase = "base"\nmodels = ["a", "b"]\n[parameters]\nscaling_factor = 1.0\nthreshold = 100\n'
    )
    stats = api.inspect(recipe, output_dir=tmp_path / "inspect", quiet=True).stats
    assert stats["majority_sign"] == -1
    norm = next(t for t in stats["tensors"] if t["name"] == "model.norm.weight")
    numel = norm["numel"]
    assert norm["dropped"] == [2 / numel, 1 / numel]  # a loses positions 0 and 2, b position 1
    assert norm["sign_conflict"] == 3 / numel and norm["model_conflict"] == [3 / numel, 3 / numel]
    assert norm["kept"] == [1.0, 1.0]
    assert all(t["dropped"] == [0.0, 0.0] for t in stats["tensors"] if t["name"] != "model.norm.weight")
