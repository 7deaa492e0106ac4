"""`hubmerge search`: the [search] table, the local search, its study, its results and best.toml.

Trials merge the tiny checkpoints of support.checkpoints; the loss they are scored by is recomputed here with
transformers directly, so that the grid test does not check the search's objective against itself.
"""

from __future__ import annotations

import json
import math
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from support.checkpoints import REPO
from support.search import GRID, one_thread, search_recipe  # noqa: F401 - one_thread: autouse

from hubmerge import api
from hubmerge.cli import main
from hubmerge.errors import RecipeError
from hubmerge.publish.lock import LOCK_FILE
from hubmerge.quality.sanity import sanity_texts
from hubmerge.recipe.load import load_recipe
from hubmerge.search.run import BEST_FILE, RESULTS_CSV, RESULTS_JSON, progress_line, search, side_by_side

pytest.importorskip("optuna")


@pytest.fixture
def models(make_model: Callable[..., Path]) -> Path:
    """base, math and code tiny checkpoints; returns their folder."""
    make_model("base", 1)
    make_model("math", 2)
    make_model("code", 3)
    return make_model("base", 1).parent


def _loss(folder: Path) -> float:
    """Mean over the sanity domains of the loss per token, computed here with transformers in float32 (what
    the layer-by-layer forward pass computes in)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    means = []
    with torch.no_grad():
        for texts in sanity_texts().values():
            total = tokens = 0.0
            for text in texts:
                ids = tokenizer(text, return_tensors="pt").input_ids
                total += model(input_ids=ids, labels=ids).loss.float().item() * (ids.shape[1] - 1)
                tokens += ids.shape[1] - 1
            means.append(total / tokens)
    return sum(means) / len(means)


def _weights(folder: Path) -> dict[str, str]:
    files = json.loads((folder / LOCK_FILE).read_text())["output"]["files"]
    return {n: e["sha256"] for n, e in files.items() if n.endswith(".safetensors")}


def _results(directory: Path) -> dict[str, Any]:
    return json.loads((directory / RESULTS_JSON).read_text())


@pytest.mark.slow
def test_grid_search_finds_the_best_of_every_grid_point_merged_and_scored_by_hand(
    models: Path, tmp_path: Path
) -> None:
    recipe = search_recipe(tmp_path, "trials = 10\n" + GRID)
    result = search(recipe, output_dir=tmp_path / "search", log=lambda _: None)
    trials = result.trials
    assert sorted(t["params"]["parameters.scaling_factor"] for t in trials) == [0.25, 0.75, 1.25]
    assert all(t["state"] == "complete" for t in trials)  # the grid bounds the budget: 3 of 10
    by_hand = {}
    for value in (0.25, 0.75, 1.25):
        one = tmp_path / f"by-hand-{value}.toml"
        one.write_text(
            f'method = "task_arithmetic"\nbase = "./models/base"\nmodels = ["./models/math", "./models/code"]\n'
            f"[parameters]\nscaling_factor = {value}\n"
        )
        merged = api.merge(one, output_dir=tmp_path / f"out-{value}", quiet=True, sanity=False, stats=False)
        by_hand[value] = (_loss(merged.output_dir), _weights(merged.output_dir))
    for t in trials:
        loss, weights = by_hand[t["params"]["parameters.scaling_factor"]]
        assert t["score"] == pytest.approx(loss, abs=1e-5)  # forward.py's bound against transformers
        assert t["weights"] == weights
    best_value = min(by_hand, key=lambda v: by_hand[v][0])
    assert result.best is not None
    assert result.best["params"] == {"parameters.scaling_factor": best_value}
    assert result.direction == "minimize"
    # best.toml is a plain recipe that merges the best trial's weights again, bit for bit.
    best = result.best_recipe
    assert best == tmp_path / "search" / BEST_FILE
    assert "[search]" not in best.read_text()
    assert main([str(best), "-q", "--no-stats"]) == 0
    assert _weights(tmp_path / "search" / "best") == result.best["weights"] == by_hand[best_value][1]
    csv_lines = (tmp_path / "search" / RESULTS_CSV).read_text().splitlines()
    assert csv_lines[0] == "number,state,score,parameters.scaling_factor,seconds,node,error"
    assert len(csv_lines) == 4
    for plot in ("search_objective.png", "search_params.png", "search_importance.png"):
        assert (tmp_path / "search" / plot).read_bytes().startswith(b"\x89PNG")
    assert result.importance == {"parameters.scaling_factor": 1.0}  # the one value searched
    assert not (tmp_path / "search" / "trials").exists() or not any(
        (tmp_path / "search" / "trials").iterdir()
    )


@pytest.mark.slow  # two spawned processes import torch and transformers: ~40 s or more on a busy machine
def test_trials_side_by_side_give_the_same_grid_results_as_one_at_a_time(
    models: Path, tmp_path: Path
) -> None:
    recipe = search_recipe(tmp_path, "concurrency = 2\n" + GRID)
    side_by_side = search(recipe, output_dir=tmp_path / "two", log=lambda _: None)
    recipe.write_text(recipe.read_text().replace("concurrency = 2\n", ""))
    alone = search(recipe, output_dir=tmp_path / "one", log=lambda _: None)

    def points(result: Any) -> dict[float, tuple[float, dict[str, str]]]:
        return {t["params"]["parameters.scaling_factor"]: (t["score"], t["weights"]) for t in result.trials}

    two, one = points(side_by_side), points(alone)
    assert sorted(two) == sorted(one) == [0.25, 0.75, 1.25]
    for value, (loss, weights) in one.items():
        assert two[value][1] == weights
        assert two[value][0] == pytest.approx(loss, rel=1e-6)


@pytest.mark.slow
def test_the_same_seed_and_sampler_draw_the_same_trials(models: Path, tmp_path: Path) -> None:
    table = """trials = 3
sampler = "tpe"
seed = 7
[search.space]
"parameters.scaling_factor" = { low = 0.1, high = 1.5 }
"models[1].weight" = { choices = [0.5, 1.0] }
"""
    recipe = search_recipe(tmp_path, table)
    first = search(recipe, output_dir=tmp_path / "a", log=lambda _: None)
    second = search(recipe, output_dir=tmp_path / "b", log=lambda _: None)
    assert [t["params"] for t in first.trials] == [t["params"] for t in second.trials]
    assert [t["score"] for t in first.trials] == [t["score"] for t in second.trials]
    assert len({t["params"]["parameters.scaling_factor"] for t in first.trials}) == 3
    # The first trial is the recipe as written (scaling_factor 0.3 by default, weight 1.0); then the sampler.
    assert first.trials[0]["as_written"] and not first.trials[1]["as_written"]
    assert first.trials[0]["params"] == {"parameters.scaling_factor": 0.3, "models[1].weight": 1.0}
    written = first.trials[0]["score"]
    assert _results(tmp_path / "a")["as_written"]["score"] == written
    header = (tmp_path / "a" / BEST_FILE).read_text()
    assert first.best is not None
    if first.best["number"] == 0:
        assert "The recipe as written (trial 0) is the best found." in header
    else:
        gain = abs(first.best["score"] - written)
        assert f"The recipe as written (trial 0) scored {written!r}; the best is {gain:.6g} better." in header
    # Importances: fANOVA's on the study as stored, seeded by the study's seed; shares that sum to 1.
    import optuna

    study = optuna.load_study(
        study_name="hubmerge-search", storage=f"sqlite:///{tmp_path / 'a' / 'study.db'}"
    )
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=7)
    expected = optuna.importance.get_param_importances(study, evaluator=evaluator)
    assert first.importance == pytest.approx(expected) and list(first.importance) == list(expected)
    assert sorted(expected) == ["models[1].weight", "parameters.scaling_factor"]
    assert sum(first.importance.values()) == pytest.approx(1.0)
    assert _results(tmp_path / "a")["importance"] == first.importance
    assert second.importance == first.importance
    assert (tmp_path / "a" / "search_importance.png").read_bytes().startswith(b"\x89PNG")
    other = search_recipe(tmp_path, table.replace("seed = 7", "seed = 8"))
    third = search(other, output_dir=tmp_path / "c", trials=2, log=lambda _: None)
    assert third.trials[1]["params"] != first.trials[1]["params"]


@pytest.mark.slow
def test_a_failing_trial_is_recorded_with_its_reason_and_the_search_completes(
    models: Path, tmp_path: Path
) -> None:
    # linear divides by the sum of the weights: -1 + 1 = 0 is refused by the trial's recipe, not the search's.
    table = """sampler = "grid"
[search.space]
"models[0].weight" = { choices = [-1.0, 0.5] }
"""
    recipe = search_recipe(tmp_path, table, method="linear")
    lines: list[str] = []
    result = search(recipe, output_dir=tmp_path / "search", log=lines.append)
    states = {t["params"]["models[0].weight"]: t for t in result.trials}
    assert states[-1.0]["state"] == "failed"
    assert "the weights sum to 0" in states[-1.0]["error"]
    assert states[-1.0]["score"] is None
    assert states[0.5]["state"] == "complete" and math.isfinite(states[0.5]["score"])
    assert result.best is not None and result.best["params"] == {"models[0].weight": 0.5}
    assert any("failed: " in line and "sum to 0" in line for line in lines)
    assert _results(tmp_path / "search")["best"]["number"] == states[0.5]["number"]


@pytest.mark.slow
def test_a_rerun_resumes_the_study_and_runs_only_the_missing_trials(models: Path, tmp_path: Path) -> None:
    table = """trials = 2
sampler = "random"
seed = 3
[search.space]
"parameters.scaling_factor" = { low = 0.1, high = 1.5 }
"""
    recipe = search_recipe(tmp_path, table)
    first = search(recipe, output_dir=tmp_path / "s", log=lambda _: None)
    again = search(recipe, output_dir=tmp_path / "s", log=lambda _: None)
    assert again.trials == first.trials  # nothing re-run
    more = search(recipe, output_dir=tmp_path / "s", trials=3, log=lambda _: None)
    assert more.trials[:2] == first.trials and len(more.trials) == 3
    # The resumed sampler does not draw the first trials' values again.
    assert len({t["params"]["parameters.scaling_factor"] for t in more.trials}) == 3
    changed = search_recipe(tmp_path, table.replace("high = 1.5", "high = 1.4"))
    with pytest.raises(Exception, match="holds a search of another recipe"):
        search(changed, output_dir=tmp_path / "s", log=lambda _: None)


def _wait_for_running_trial(db: Path, process: subprocess.Popen[str]) -> None:
    """Until the study holds a finished trial and a running one whose values are drawn and stored: the process
    is provably mid-trial. (A trial is RUNNING in the study a moment before the sampler stores its values; one
    stopped in that moment has nothing to retry, and the resume rightly draws afresh.)"""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if db.exists():
            try:
                with sqlite3.connect(db) as c:
                    states = [s for (s,) in c.execute("select state from trials")]
                    drawn = c.execute(
                        "select count(*) from trials t join trial_params p on p.trial_id = t.trial_id"
                        " where t.state = 'RUNNING'"
                    ).fetchone()[0]
            except sqlite3.OperationalError:  # the tables are being created
                states, drawn = [], 0
            if "COMPLETE" in states and drawn:
                return
        time.sleep(0.2)
    raise AssertionError("no trial was running in time")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_a_search_stopped_mid_trial_resumes_without_losing_or_repeating_a_finished_trial(
    models: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    # No pruner: a pruned trial is finished but not complete, and the resume's budget below counts complete
    # trials (test_the_median_pruner_... resumes a study with pruned trials).
    table = """trials = 40
sampler = "random"
seed = 5
pruner = "none"
[search.space]
"parameters.scaling_factor" = { low = 0.1, high = 1.5 }
"""
    recipe = search_recipe(tmp_path, table)
    out = tmp_path / "s"
    process = subprocess.Popen(
        [sys.executable, "-m", "hubmerge.cli", "search", str(recipe), "--output", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_running_trial(out / "study.db", process)
        process.send_signal(sig)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), err
    if sig == signal.SIGINT:
        assert "run the same command again to resume the search" in err
    with sqlite3.connect(out / "study.db") as c:
        before = dict(c.execute("select number, state from trials").fetchall())
    finished = [n for n, s in before.items() if s == "COMPLETE"]
    interrupted = [n for n, s in before.items() if s == "RUNNING"]
    assert finished and len(interrupted) == 1
    earlier = {t["number"]: t for t in _results(out)["trials"]}
    # Resume with a budget of one trial more than were finished: that one is the interrupted trial, retried.
    budget = len(finished) + 1
    assert main(["search", str(recipe), "--output", str(out), "--trials", str(budget), "-q"]) == 0
    trials = {t["number"]: t for t in _results(out)["trials"]}
    for n in finished:  # kept as they were, not run again
        assert trials[n] == earlier[n]
    lost = trials[interrupted[0]]
    assert lost["state"] == "failed" and "interrupted" in lost["error"]
    retried = [t for t in trials.values() if t["number"] > max(before) and t["params"] == lost["params"]]
    assert len(retried) == 1 and retried[0]["state"] == "complete"
    complete = [t for t in trials.values() if t["state"] == "complete"]
    assert len(complete) == budget  # the budget, met exactly
    assert len({t["params"]["parameters.scaling_factor"] for t in complete}) == budget


@pytest.mark.slow
def test_values_per_group_of_layers_and_filter_become_filter_rules_that_best_toml_reproduces(
    models: Path, tmp_path: Path
) -> None:
    table = """trials = 2
sampler = "random"
seed = 1
[search.space]
"parameters.scaling_factor" = { low = 0.1, high = 1.5, layers_per_group = 1, filters = ["self_attn", "mlp"] }
"""
    recipe = search_recipe(tmp_path, table)
    recipe.write_text(recipe.read_text().replace("[search]", "[parameters]\nscaling_factor = 0.8\n[search]"))
    result = search(recipe, output_dir=tmp_path / "s", log=lambda _: None)
    names = [f"parameters.scaling_factor@layers.{i}-{i}.{f}" for i in (0, 1) for f in ("self_attn", "mlp")]
    assert all(sorted(t["params"]) == sorted(names) for t in result.trials)
    assert result.best is not None and result.best_recipe is not None
    best = load_recipe(result.best_recipe)
    rules = best.parameters["scaling_factor"]
    assert [r.filter for r in rules] == [
        "layers.0.self_attn.",
        "layers.0.mlp.",
        "layers.1.self_attn.",
        "layers.1.mlp.",
        None,
    ]
    assert [r.value for r in rules] == [result.best["params"][n] for n in names] + [0.8]
    assert main([str(result.best_recipe), "-q", "--no-stats"]) == 0
    assert _weights(tmp_path / "s" / "best") == result.best["weights"]


@pytest.mark.slow  # lm-eval on every trial: ~40 s
def test_an_eval_task_in_the_objective_is_maximised_with_the_loss_negated(
    models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(REPO)  # the offline task's data_files are relative to the repository
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    table = """sampler = "grid"
[search.space]
"parameters.scaling_factor" = { choices = [0.5, 1.0] }
[search.objective]
hubmerge_tiny = 1.0
loss = 0.5
"""
    recipe = search_recipe(tmp_path, table)
    tasks = REPO / "tests" / "data" / "lm_eval"
    recipe.write_text(
        recipe.read_text().replace(
            "[search]", f'[eval]\ntasks = ["hubmerge_tiny"]\ninclude_path = "{tasks}"\nlimit = 8\n[search]'
        )
    )
    result = search(recipe, output_dir=tmp_path / "s", log=lambda _: None)
    assert result.direction == "maximize"
    for t in result.trials:
        terms = t["terms"]
        assert 0 <= terms["hubmerge_tiny"] <= 1  # acc, lm-eval's primary metric of the task, higher is better
        assert t["score"] == pytest.approx(terms["hubmerge_tiny"] - 0.5 * terms["loss"])
    assert result.best is not None
    assert result.best["score"] == max(t["score"] for t in result.trials)


BAD_TABLES = [
    (
        '[search.space]\n"parameters.scaling_factor" = { low = 1.0, high = 0.5 }',
        'search.space."parameters.scaling_factor": high (0.5) must be above low (1.0)',
    ),
    (
        '[search.space]\n"parameters.scaling_factor" = { lo = 0.1, high = 0.5 }',
        "search.space.\"parameters.scaling_factor\".lo: unknown key; did you mean 'low'?",
    ),
    (
        '[search.space]\n"parameters.scaling_factor" = 0.5',
        'search.space."parameters.scaling_factor": must be a range { low = ..., high = ... } or { choices = [...] }, got 0.5',
    ),
    (
        '[search.space]\n"parameters.scaling_factor" = { choices = [] }',
        'search.space."parameters.scaling_factor".choices: must not be empty',
    ),
    (
        '[search.space]\n"parameters.lambda" = { low = 0.1, high = 0.5 }',
        "search.space.\"parameters.lambda\": task_arithmetic has no parameter 'lambda'",
    ),
    (
        '[search.space]\n"models[2].weight" = { low = 0.1, high = 0.5 }',
        'search.space."models[2].weight": the recipe has 2 models (models[0] to models[1])',
    ),
    (
        '[search.space]\n"scaling_factor" = { low = 0.1, high = 0.5 }',
        'search.space."scaling_factor": is not a recipe path; write "parameters.NAME" or "models[I].NAME"',
    ),
    (
        '[search.space]\n"parameters.scaling_factor" = { low = 0.0, high = 1.0, log = true }',
        'search.space."parameters.scaling_factor": a log range needs low > 0, got 0.0',
    ),
    (
        'sampler = "grid"\n[search.space]\n"parameters.scaling_factor" = { low = 0.1, high = 1.0 }',
        'search.space."parameters.scaling_factor": the grid sampler needs a step in every range (or choices)',
    ),
    (
        'sampler = "tp"\n[search.space]\n"parameters.scaling_factor" = { low = 0.1, high = 1.0 }',
        "search.sampler: must be one of 'tpe', 'cmaes', 'random', 'grid', got 'tp'",
    ),
    (
        'pruner = "mean"\n[search.space]\n"parameters.scaling_factor" = { low = 0.1, high = 1.0 }',
        "search.pruner: must be one of 'median', 'hyperband', 'none', got 'mean'",
    ),
    (
        'concurrency = "all"\n[search.space]\n"parameters.scaling_factor" = { low = 0.1, high = 1.0 }',
        "search.concurrency: must be a number of trials (1 or more) or \"auto\", got 'all'",
    ),
    (
        'trials = 0\n[search.space]\n"parameters.scaling_factor" = { low = 0.1, high = 1.0 }',
        "search.trials: must be >= 1, got 0",
    ),
    (
        '[search.space]\n"parameters.scaling_factor" = { low = 0.1, high = 1.0 }\n[search.objective]\ngsm8k = 1.0',
        'search.objective.gsm8k: is neither "loss", "loss.DOMAIN" nor an [eval] task',
    ),
    (
        '[search.space]\n"parameters.scaling_factor" = { low = 0.1, high = 1.0 }\n[search.objective]\n"loss.poetry" = 1.0',
        'search.objective."loss.poetry": no such text domain; the texts\' domains: math, code, chat',
    ),
    ("trials = 2", "search.space: is required"),
    (
        '[search.space]\n"parameters.scaling_factor" = { low = 0.1, high = 1.0, filters = ["mlp"] }',
        'search.space."parameters.scaling_factor".filters: needs layers_per_group: filters split each group of layers',
    ),
]


@pytest.mark.parametrize(("table", "message"), BAD_TABLES)
def test_a_bad_search_table_is_refused_with_one_line(
    models: Path, tmp_path: Path, table: str, message: str
) -> None:
    recipe = search_recipe(tmp_path, table)
    with pytest.raises(RecipeError) as raised:
        load_recipe(recipe)
    text = str(raised.value)
    assert "\n" not in text
    assert text.startswith(f"{recipe}: {message}"), text


def test_the_docs_search_examples_are_valid(tmp_path: Path) -> None:
    page = (REPO / "docs" / "search.md").read_text()
    search_example = page.split("```toml\n", 1)[1].split("```", 1)[0]
    recipe = tmp_path / "search.toml"
    recipe.write_text(search_example.replace("./tiny/", f"{REPO}/recipes/examples/tiny/"))
    assert load_recipe(recipe).search is not None
    reference = (REPO / "docs" / "recipe.md").read_text().split("```toml\n", 1)[1].split("```", 1)[0]
    table = "[search]" + reference.split("[search]", 1)[1]
    (tmp_path / "my_texts.txt").write_text("Some text.\n\nMore text.\n")
    recipe.write_text(
        'method = "task_arithmetic"\nbase = "./models/base"\nmodels = ["./models/math", "./models/code"]\n'
        '[parameters]\nscaling_factor = 0.5\n[eval]\ntasks = ["gsm8k"]\n' + table
    )
    for name in ("base", "math", "code"):
        (tmp_path / "models" / name).mkdir(parents=True)
    spec = load_recipe(recipe).search
    assert spec is not None and spec.dimensions[1].filters == ("self_attn", "mlp")


def test_the_search_command_refuses_a_recipe_without_a_search_table_in_one_line(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "plain.toml"
    recipe.write_text('method = "task_arithmetic"\nbase = "./models/base"\nmodels = ["./models/math"]\n')
    assert main(["search", str(recipe), "--output", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hubmerge: error: {recipe}: no [search] table; add one") and err.count("\n") == 1
    assert main(["search", str(recipe), "--trials", "0"]) == 1
    assert "--trials must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_the_search_table_is_in_the_json_schema() -> None:
    from hubmerge.recipe.schema import json_schema

    text = json.dumps(json_schema())
    assert "SearchTable" in text and '"grid"' in text


PRUNED = """sampler = "grid"
seed = 2
[search.space]
"parameters.scaling_factor" = { choices = [0.1, 0.2, 0.3, 0.4, 0.5, 3.0, 0.6, 4.0] }
"""


@pytest.mark.slow
def test_the_median_pruner_stops_trials_worse_than_the_median_so_far_and_a_resume_keeps_them_pruned(
    models: Path, tmp_path: Path
) -> None:
    recipe = search_recipe(tmp_path, PRUNED)  # the default pruner: median, after 5 complete trials
    out = tmp_path / "s"
    lines: list[str] = []
    first = search(recipe, output_dir=out, trials=6, log=lines.append)
    result = search(recipe, output_dir=out, log=lines.append)  # resumed: the grid's 8 points
    assert result.trials[:6] == first.trials  # finished and pruned trials are kept, not run again
    order = [t["params"]["parameters.scaling_factor"] for t in result.trials]
    assert order == [0.5, 0.2, 0.6, 0.3, 0.4, 4.0, 3.0, 0.1]  # the grid's order for seed 2
    states = [t["state"] for t in result.trials]
    assert states == ["complete"] * 5 + ["pruned"] * 3
    startup = result.trials[:5]
    for t in startup:  # scored in three stages (the sanity texts' domains), the last one the score
        assert len(t["intermediate"]) == 3 and t["intermediate"][-1] == t["score"]
    median = sorted(t["intermediate"][0] for t in startup)[2]
    for t in result.trials[5:]:  # stopped after the first domain: worse than the median there
        assert t["score"] is None and t["error"] == "pruned after step 0"
        assert len(t["intermediate"]) == 1 and t["intermediate"][0] > median
    with sqlite3.connect(out / "study.db") as c:
        stored = [s for (s,) in c.execute("select state from trials order by number")]
    assert stored == ["COMPLETE"] * 5 + ["PRUNED"] * 3
    assert "trial 5 (6/6) pruned after step 0; best" in lines[5]
    assert search(recipe, output_dir=out, log=lines.append).trials == result.trials  # nothing left to run
    assert len(lines) == 8


@pytest.mark.slow  # eight trials, ~11 s; the median pruner's test covers the shared path in the fast set
def test_the_hyperband_pruner_stops_trials_at_its_rung_and_its_bookkeeping_reaches_the_study(
    models: Path, tmp_path: Path
) -> None:
    recipe = search_recipe(tmp_path, PRUNED.replace("seed = 2", 'seed = 2\npruner = "hyperband"'))
    result = search(recipe, output_dir=tmp_path / "s", log=lambda _: None)
    assert [t["state"] for t in result.trials] == ["complete"] * 5 + ["pruned"] * 3
    assert all(len(t["intermediate"]) == 2 for t in result.trials[5:])  # stopped after the second domain
    assert all(t["error"] == "pruned after step 1" for t in result.trials[5:])
    with sqlite3.connect(tmp_path / "s" / "study.db") as c:
        rungs = c.execute("select count(*) from trial_system_attributes where key = 'completed_rung_0'")
        assert rungs.fetchone() == (5,)  # successive halving's notes, made in the trial, kept by the study


def test_the_progress_line_gives_the_best_so_far_and_the_time_left_at_the_mean_trial() -> None:
    best = {"number": 2, "score": 1.5}
    done = {"number": 4, "state": "complete", "score": 1.75}
    line = progress_line(done, 5, 20, best, [30.0, 50.0], capacity=2)
    assert line == "trial 4 (5/20) score 1.75; best 1.5 (trial 2); ETA 0:05:20"  # 40 s × 8 rounds of 2
    failed = {"number": 5, "state": "failed", "error": "the weights sum to 0"}
    assert progress_line(failed, 20, 20, None, [1.0], 1) == (
        "trial 5 (20/20) failed: the weights sum to 0; no trial complete yet"
    )


def test_side_by_side_sizing_takes_the_scarcest_of_memory_disk_and_cores() -> None:
    gib = 2**30
    # 0.5B-shaped trial: 1 GiB to merge and score, 1 GB of output.
    assert side_by_side(gib, 10**9, memory=7 * gib, disk=100 * 10**9, cpus=16) == 7  # memory
    assert side_by_side(gib, 10**9, memory=64 * gib, disk=3 * 10**9 + 5, cpus=16) == 3  # disk
    assert side_by_side(gib, 10**9, memory=64 * gib, disk=100 * 10**9, cpus=2) == 2  # cores
    assert side_by_side(4 * gib, 10**9, memory=3 * gib, disk=10**8, cpus=2) == 1  # none fits: still one


def test_concurrency_auto_is_accepted_and_kept_in_the_spec(models: Path, tmp_path: Path) -> None:
    recipe = search_recipe(tmp_path, 'concurrency = "auto"\n' + GRID)
    spec = load_recipe(recipe).search
    assert spec is not None and spec.concurrency == "auto"
