"""Evaluation (evaluate.py), the quick sanity check (sanity.py) and the `[eval]` table, on the tiny checkpoints.

lm-eval runs offline on a custom multiple-choice task over a JSON-lines file in tests/data/lm_eval (its
`data_files` path is relative to the repository root, so these tests run lm-eval from there).
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.checkpoints import REPO, TINY
from support.cli import invoke_cli
from support.evaluation import TASKS, lm_eval_offline
from support.evaluation import eval_recipe as recipe
from support.hub import local_hub
from support.hubserver import LocalHub

from hubmerge import api
from hubmerge.errors import RecipeError
from hubmerge.publish.lock import file_sha256
from hubmerge.quality.evaluate import CHART_FILE, RESULTS_FILE
from hubmerge.quality.sanity import LOSS_RATIO
from hubmerge.recipe.load import load_recipe

TOKEN = "hf_test_user_token"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """lm-eval and datasets never reach the network; results are cached under this test's HF_HOME."""
    lm_eval_offline(monkeypatch, tmp_path / "hf_home")
    monkeypatch.delenv("HUBMERGE_NO_SANITY", raising=False)


@pytest.fixture
def evaluate_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts lm-eval's `simple_evaluate` runs (the real function runs): the folder each one evaluated."""
    import lm_eval

    calls: list[str] = []
    real = lm_eval.simple_evaluate

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["model"].model.name_or_path)
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", counting)
    return calls


def metadata(card: str) -> dict[str, Any]:
    from huggingface_hub import ModelCard

    data: dict[str, Any] = ModelCard(card).data.to_dict()
    return data


# --- the [eval] table -----------------------------------------------------------------------------------------


def test_eval_table_reads_every_key_and_the_gate_syntax(tmp_path: Path) -> None:
    spec = load_recipe(
        recipe(
            tmp_path,
            eval_table='limit = 8\nnum_fewshot = 0\nbatch_size = 4\ndevice = "cuda:1"\ndtype = "float32"\n'
            "sources = false\nallow_code_execution = true\nsanity = false\n"
            'require = { hubmerge_tiny = "best_source - 0.02" }\n',
        )
    )
    assert spec.eval is not None and spec.sanity is False
    e = spec.eval
    assert (e.tasks, e.limit, e.num_fewshot, e.batch_size, e.device, e.dtype) == (
        ("hubmerge_tiny",),
        8,
        0,
        4,
        "cuda:1",
        "float32",
    )
    assert (e.include_path, e.sources, e.allow_code_execution) == (TASKS, False, True)
    (r,) = e.require
    assert (r.task, r.threshold, r.reference, r.offset) == ("hubmerge_tiny", None, "best_source", -0.02)
    (absolute,) = load_recipe(recipe(tmp_path, eval_table="require = { hubmerge_tiny = 0.4 }\n")).eval.require  # type: ignore[union-attr]
    assert (absolute.threshold, absolute.reference) == (0.4, None)
    plain = load_recipe(tmp_path / "recipe.toml").eval
    assert plain is not None and plain.sources and not plain.allow_code_execution and plain.dtype == "auto"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            'require = { hubmerge_tiny = "best - 1" }',
            'eval.require.hubmerge_tiny: must be a score such as 0.40, or "best_source"',
        ),
        ("require = { gsm8k = 0.4 }", "eval.require.gsm8k: is not one of eval.tasks (hubmerge_tiny)"),
        ("limit = 0", "eval.limit: must be a number of examples"),
        ('device = "tpu"', 'eval.device: must be "cpu", "cuda", "cuda:N" or "mps"'),
        ("sanity_check = false", "eval.sanity_check: unknown key; did you mean 'sanity'?"),
    ],
)
def test_eval_table_mistakes_name_the_key(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(RecipeError, match="^.*" + message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(recipe(tmp_path, eval_table=table + "\n"))


def test_a_base_rule_needs_a_base(tmp_path: Path) -> None:
    path = tmp_path / "avg.toml"
    path.write_text(
        f'method = "simple_average"\nmodels = ["{TINY / "math"}", "{TINY / "coder"}"]\n'
        '[eval]\ntasks = ["x"]\nrequire = { x = "base" }\n'
    )
    with pytest.raises(
        RecipeError, match=r"eval\.require\.x: compares with the base, but the recipe has none"
    ):
        load_recipe(path)


# --- evaluation -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_results_agree_in_json_card_and_model_index_and_the_cache_reevaluates_only_the_new_merge(
    tmp_path: Path, evaluate_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    quiet: Callable[[str], None] = lambda _: None  # noqa: E731
    result = api.merge(recipe(tmp_path), push=False, evaluate=True, sanity=False, log=quiet)
    out = tmp_path / "out"
    data = json.loads((out / RESULTS_FILE).read_text())["lm_eval"]
    models = data["models"]
    assert [m["role"] for m in models] == ["merged", "base", "model", "model", "model"]
    assert len(evaluate_calls) == 5
    scores = [m["results"]["hubmerge_tiny"] for m in models]
    assert all(list(s) == ["acc,none", "brier_score,none"] for s in scores)
    brier = [s["brier_score,none"]["value"] for s in scores]
    assert len(set(brier)) == 5 and all(0 < b < 2 for b in brier)  # every model scores differently
    assert all(0 <= s["acc,none"]["value"] <= 1 for s in scores)
    assert scores[0]["brier_score,none"]["higher_is_better"] is False

    card = (out / "README.md").read_text()
    (entry,) = metadata(card)["model-index"]
    found = {(r["dataset"]["name"], m["name"]): m["value"] for r in entry["results"] for m in r["metrics"]}
    assert found == {("hubmerge_tiny", metric): scores[0][metric]["value"] for metric in scores[0]}
    merged_acc = scores[0]["acc,none"]["value"]
    row = next(line for line in card.splitlines() if line.startswith("| hubmerge_tiny | `acc,none`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"**{merged_acc:.4f}**"
    for i, s in enumerate(scores[1:]):
        assert cells[3 + 2 * i] == f"{s['acc,none']['value']:.4f}"
        assert cells[4 + 2 * i] == f"{merged_acc - s['acc,none']['value']:+.4f}"
    assert f"![Evaluation results]({CHART_FILE})" in card
    png = (out / CHART_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[0] > 100
    lock = json.loads((out / "hubmerge.lock.json").read_text())
    assert {RESULTS_FILE, CHART_FILE, "README.md"} <= set(lock["output"]["files"])
    assert (
        result.evaluation is not None
        and result.evaluation.merged.scores["hubmerge_tiny"]["acc,none"].value == merged_acc
    )
    first = result.evaluation

    # Another merge of the same sources: only the merge is evaluated, the sources come from the cache.
    second = api.merge(
        recipe(tmp_path, 0.5, name="again.toml", output="again"),
        push=False,
        evaluate=True,
        sanity=False,
        log=quiet,
    ).evaluation
    assert second is not None
    # Only the new merge ran, in its staging folder next to the output.
    assert len(evaluate_calls) == 6 and Path(evaluate_calls[5]).parent == tmp_path
    assert Path(evaluate_calls[5]).name.startswith(".again.hubmerge-")
    assert [m.cached for m in second.models] == [False, True, True, True, True]
    assert [m.scores for m in second.models[1:]] == [m.scores for m in first.models[1:]]
    assert second.merged.scores != first.merged.scores  # another merge, other scores

    # `hubmerge eval --sources` with an empty cache: every model runs again and scores exactly as before.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "fresh"))
    again = api.evaluate(tmp_path / "recipe.toml", sources=True, log=quiet).evaluation
    assert len(evaluate_calls) == 6 + 5
    assert [m.scores for m in again.models] == [m.scores for m in first.models]
    assert not any(m.cached for m in again.models)
    recorded = json.loads((out / "hubmerge.lock.json").read_text())["output"]["files"]
    for name in (RESULTS_FILE, CHART_FILE, "README.md"):  # the lock follows the files eval rewrote
        assert recorded[name]["sha256"] == file_sha256(out / name)


def test_eval_command_refuses_a_folder_without_a_merge(tmp_path: Path) -> None:
    result = invoke_cli("eval", recipe(tmp_path), cwd=REPO)
    assert result.returncode == 7
    assert result.stderr.strip() == (
        f"hubmerge: error: {tmp_path / 'out'} holds no hubmerge output to evaluate; run `hubmerge "
        f"{tmp_path / 'recipe.toml'}` first"
    )


def test_without_the_extra_eval_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` fails as without the extra
    result = invoke_cli(recipe(tmp_path), "--eval", cwd=REPO)
    assert result.returncode == 7
    assert 'run: pip install "hubmerge[eval]"' in result.stderr
    assert "(lm_eval is missing)" in result.stderr
    assert not (tmp_path / "out").exists()  # it stopped before downloading or merging


@pytest.mark.slow
def test_code_execution_tasks_need_explicit_permission(tmp_path: Path) -> None:
    unsafe = tmp_path / "tasks"
    unsafe.mkdir()
    task = (TASKS / "hubmerge_tiny.yaml").read_text().replace("task: hubmerge_tiny", "task: hubmerge_unsafe")
    (unsafe / "unsafe.yaml").write_text(task + "unsafe_code: true\n")
    path = tmp_path / "unsafe.toml"
    path.write_text(
        recipe(tmp_path)
        .read_text()
        .replace(str(TASKS), str(unsafe))
        .replace('"hubmerge_tiny"', '"hubmerge_unsafe"')
    )
    with pytest.raises(
        RecipeError, match="set \\[eval\\] allow_code_execution = true only if you accept that"
    ):
        api.merge(path, push=False, evaluate=True, sanity=False, log=lambda _: None)


# --- the gate -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub() -> Iterator[LocalHub]:
    with local_hub() as server:
        yield server


@pytest.mark.slow
def test_gate_blocks_a_push_that_misses_require_and_lets_a_passing_one_through(
    hub: LocalHub, tmp_path: Path
) -> None:
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "HF_TOKEN": TOKEN,
        "HUBMERGE_NO_SANITY": "1",
    }
    summary = tmp_path / "summary.md"

    def run(rule: str) -> Any:
        path = recipe(
            tmp_path,
            eval_table=f"limit = 8\nbatch_size = 8\nsources = false\nrequire = {{ hubmerge_tiny = {rule} }}\n",
        )
        path.write_text(path.read_text().replace("[output]\n", '[output]\nrepo = "user/gated"\n'))
        return invoke_cli(path, "--eval", "-q", "--summary", summary, cwd=REPO, env=env)

    missed = run("1.01")
    assert missed.returncode == 8, missed.stderr
    assert "hubmerge: error: the merge misses [eval] require (hubmerge_tiny acc,none = " in missed.stderr
    assert "required at least 1.0100 (1.01): MISSED); it is in" in missed.stderr
    assert "but was not pushed" in missed.stderr
    assert "user/gated" not in hub._repos  # nothing was created or pushed
    assert "❌ hubmerge_tiny acc,none" in summary.read_text()

    passed = run("0.0")
    assert passed.returncode == 0, passed.stderr
    pushed = hub.files("user/gated")
    assert pushed[RESULTS_FILE] == (tmp_path / "out" / RESULTS_FILE).read_bytes()
    assert pushed[CHART_FILE][:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Evaluation" in pushed["README.md"].decode()
    results = json.loads(pushed[RESULTS_FILE])["lm_eval"]
    assert results["require"][0]["passed"] is True and [m["role"] for m in results["models"]] == ["merged"]
    assert results["models"][0]["cached"] is True  # the same merge as the gated run: from the cache
    assert "✅ hubmerge_tiny acc,none" in summary.read_text()


# --- the sanity check -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sanity_check_catches_a_broken_merge(tmp_path: Path) -> None:
    messages: list[str] = []
    path = recipe(tmp_path, scaling_factor=50.0)
    result = api.merge(path, push=False, log=messages.append)
    report = result.sanity
    assert report is not None and not report.passed
    for domain in ("math", "code", "chat"):
        worst = max(report.losses[name][domain] for name in report.losses if name != "merged")
        assert report.losses["merged"][domain] > LOSS_RATIO * worst
    assert any(
        m.startswith("WARNING: sanity check: the merged model's loss on math texts is") for m in messages
    )
    card = (tmp_path / "out" / "README.md").read_text()
    assert "**This merge failed hubmerge's sanity check.**" in card
    assert json.loads((tmp_path / "out" / RESULTS_FILE).read_text())["sanity"]["passed"] is False


@pytest.mark.slow
def test_sanity_check_passes_the_shipped_demo(tmp_path: Path) -> None:
    messages: list[str] = []
    result = api.merge(
        REPO / "recipes/examples/tiny-ties.toml",
        output_dir=tmp_path / "demo",
        push=False,
        log=messages.append,
    )
    report = result.sanity
    assert report is not None and report.passed, report
    assert set(report.losses) == {"merged", "./tiny/base", "./tiny/math", "./tiny/coder", "./tiny/instruct"}
    assert all(0 < loss < 10 for losses in report.losses.values() for loss in losses.values())
    assert any(m.startswith("sanity check passed: merged loss per token math") for m in messages)
    assert "sanity check" not in (tmp_path / "demo" / "README.md").read_text()
    assert json.loads((tmp_path / "demo" / RESULTS_FILE).read_text()) == {
        "lm_eval": None,
        "sanity": report.to_json(),
    }


@pytest.mark.slow
def test_no_sanity_turns_the_check_off(tmp_path: Path) -> None:
    result = invoke_cli(
        REPO / "recipes/examples/tiny-ties.toml", "--output", tmp_path / "o", "--no-sanity", "-q"
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "o" / RESULTS_FILE).exists()
    path = recipe(tmp_path, eval_table="limit = 8\nsanity = false\n")
    assert api.merge(path, push=False, log=lambda _: None).sanity is None
