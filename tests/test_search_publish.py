"""`hubmerge search --publish best` against the local Hub: the best trial's recipe merged and pushed as a plain
merge pushes it, the card with a section on the search (the CLI in process, `support.cli.invoke_cli`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.cli import invoke_cli
from support.hub import hub_env, local_hub
from support.hubserver import LocalHub
from support.search import one_thread  # noqa: F401 - autouse

from hubmerge import api
from hubmerge.cli import main
from hubmerge.search.run import BEST_FILE, RESULTS_JSON

pytest.importorskip("optuna")


@pytest.fixture(scope="module")
def hub() -> Iterator[LocalHub]:
    with local_hub() as server:
        yield server


def _recipe(tmp_path: Path, make_model: Callable[..., Path], output: str) -> Path:
    for name, seed in (("base", 1), ("math", 2), ("code", 3)):
        make_model(name, seed)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        'method = "task_arithmetic"\nbase = "./models/base"\nmodels = ["./models/math", "./models/code"]\n'
        f"{output}"
        '[search]\nsampler = "random"\nseed = 4\ntrials = 3\n'
        '[search.space]\n"parameters.scaling_factor" = { low = 0.1, high = 1.5 }\n'
    )
    return recipe


@pytest.mark.slow
def test_publish_best_pushes_the_merge_of_best_toml_with_a_card_section_on_the_search(
    hub: LocalHub, tmp_path: Path, make_model: Callable[..., Path]
) -> None:
    recipe = _recipe(tmp_path, make_model, '[output]\ndir = "out"\nrepo = "user/searched"\n')
    out = tmp_path / "search"
    done = invoke_cli("search", recipe, "--output", out, "--publish", "best", "-q", env=hub_env(hub, tmp_path))
    assert done.returncode == 0, done.stderr
    results = json.loads((out / RESULTS_JSON).read_text())
    best, trials = results["best"], results["trials"]
    assert len(trials) == 3 and all(t["state"] == "complete" for t in trials)
    pushed = hub.files("user/searched")
    # The pushed weights are best.toml's merge: merged again here, by hand, they are the same bytes.
    again = api.merge(out / BEST_FILE, output_dir=tmp_path / "again", quiet=True, sanity=False, stats=False)
    assert pushed["model.safetensors"] == (again.output_dir / "model.safetensors").read_bytes()
    assert pushed["model.safetensors"] == (out / "best" / "model.safetensors").read_bytes()
    assert pushed["hubmerge.toml"] == (out / BEST_FILE).read_bytes()
    card = pushed["README.md"].decode()
    assert card == (out / "best" / "README.md").read_text()
    section = card.split("### How these values were found\n", 1)[1].split("\n## ", 1)[0]
    written = trials[0]  # the recipe as written: scaling_factor's default, 0.3
    assert written["as_written"] and written["params"] == {"parameters.scaling_factor": 0.3}
    head = (
        "`hubmerge search` ran 3 trials (3 complete) with Optuna's random sampler (seed 4): each merged the "
        "recipe with the trial's values and scored the merge by 1·loss, minimized. "
        f"Trial {best['number']} scored best, {best['score']:.6g}"
    )
    assert head in section
    if best["number"] != 0:
        gain = written["score"] - best["score"]
        assert f"the recipe as written (trial 0) scored {written['score']:.6g}, {gain:.6g} worse." in section
    assert "| `parameters.scaling_factor` | 0.1 to 1.5 |" in section
    ranked = sorted(trials, key=lambda t: t["score"])
    rows = [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows == [
        f"| {t['number']} | {t['score']:.6g} | {t['params']['parameters.scaling_factor']!r} |" for t in ranked
    ]
    assert ranked[0]["number"] == best["number"]


def test_publish_best_without_an_output_repo_is_refused_before_any_trial(
    tmp_path: Path, make_model: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(tmp_path, make_model, "")
    out = tmp_path / "search"
    assert main(["search", str(recipe), "--output", str(out), "--publish", "best"]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"hubmerge: error: {recipe}: --publish best pushes to [output] repo; set it "
        '(repo = "user/name") or drop --publish\n'
    )
    assert not out.exists()
