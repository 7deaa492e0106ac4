"""The web app's named endpoints through `gradio_client` against `hubmerge ui` on 127.0.0.1 (`/validate`,
`/plan`, `/merge`), and what the app's service guarantees without a browser: the public mode's refusal of
local folders, a cancel that leaves nothing behind, errors at their recipe line."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from support.checkpoints import REPO, TINY
from support.uiapp import Served, serve

from hubmerge.cli import main
from hubmerge.recipe.load import loads_recipe
from hubmerge.ui.service import Service, Settings, key_line

pytestmark = pytest.mark.slow  # the app is a real `hubmerge ui` process, started once for the module

RECIPE = f"""method = "ties"
base = "{TINY / "base"}"
models = ["{TINY / "math"}", "{TINY / "coder"}"]

[parameters]
scaling_factor = 0.8
threshold = 20
"""


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, known_hashes_store: Path) -> Iterator[Served]:
    with serve(tmp_path_factory.mktemp("ui"), env={"HUBMERGE_CACHE": str(known_hashes_store)}) as served:
        yield served


@pytest.fixture(scope="module")
def client(app: Served) -> Client:
    return Client(app.url, verbose=False)


def _cli_error(tmp_path: Path, text: str, *args: str) -> tuple[Path, str]:
    """Where the recipe `text` was written, and the one error line the CLI prints for it."""
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path, _cli_lines(path, *args)


def _cli_lines(path: Path, *args: str) -> str:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([*args, str(path)] if args else [str(path)])
    assert code != 0
    lines = err.getvalue().splitlines()
    assert len(lines) == 1, lines
    return lines[0].removeprefix("hubmerge: error: ")


def test_validate_says_ok_for_a_valid_recipe(client: Client) -> None:
    assert client.predict(RECIPE, api_name="/validate") == "ok"


@pytest.mark.parametrize(
    "broken",
    [
        RECIPE.replace("threshold", "treshold"),  # schema: unknown key, with the suggestion
        RECIPE.replace('method = "ties"', 'method = "ties'),  # TOML syntax, with line and column
        RECIPE.replace(str(TINY / "coder"), "./nowhere"),  # a local folder that does not exist
    ],
)
def test_validate_returns_the_cli_error_line(client: Client, tmp_path: Path, broken: str) -> None:
    path, expected = _cli_error(tmp_path, broken, "validate")
    assert client.predict(broken, str(path), api_name="/validate") == expected


def test_plan_equals_the_cli_plan_json(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE)
    got = json.loads(client.predict(RECIPE, str(path), api_name="/plan"))
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", str(path), "--json"]) == 0
    expected = json.loads(out.getvalue())
    # Where the output goes (the app's work folder) and the free space there are the app's own.
    for plan in (got, expected):
        del plan["output"]["dir"]
        plan.pop("disk")
    assert got == expected
    assert got["method"] == "ties" and [s["role"] for s in got["sources"]] == [
        "base",
        "models[0]",
        "models[1]",
    ]


def test_plan_error_is_the_cli_line_without_traceback(client: Client, app: Served, tmp_path: Path) -> None:
    broken = RECIPE.replace(str(TINY / "coder"), "./nowhere")
    path, expected = _cli_error(tmp_path, broken, "plan")
    with pytest.raises(AppError) as caught:
        client.predict(broken, str(path), api_name="/plan")
    assert str(caught.value) == expected
    assert "Traceback" not in app.log.read_text()


def test_merge_returns_the_card_then_the_files_of_a_cli_merge(
    client: Client, app: Served, tmp_path: Path
) -> None:
    card, files = client.predict(RECIPE, str(tmp_path / "two.toml"), api_name="/merge")
    by_name = {Path(f).name: Path(f) for f in files}
    assert {"README.md", "hubmerge.lock.json", "config.json", "model.safetensors"} <= set(by_name)
    assert card == by_name["README.md"].read_text()
    assert card.startswith("---\n") and "\n# two\n" in card
    # The same weights, byte for byte, as the CLI's merge of the same recipe.
    recipe = tmp_path / "two.toml"
    recipe.write_text(RECIPE)
    assert main([str(recipe), "--output", str(tmp_path / "cli"), "-q"]) == 0
    assert by_name["model.safetensors"].read_bytes() == (tmp_path / "cli" / "model.safetensors").read_bytes()
    # Written under the app's work folder, nowhere else.
    runs = list((app.work / "runs").glob("*/two"))
    assert len(runs) == 1 and (runs[0] / "model.safetensors").is_file()


def test_merge_of_a_bad_recipe_is_one_clear_error_and_writes_nothing(
    client: Client, app: Served, tmp_path: Path
) -> None:
    broken = RECIPE.replace("[parameters]", "[parameters")
    path, expected = _cli_error(tmp_path, broken)
    before = set((app.work / "runs").glob("*")) if (app.work / "runs").is_dir() else set()
    with pytest.raises(AppError) as caught:
        client.predict(broken, str(path), api_name="/merge")
    assert str(caught.value) == expected and ":5:" in expected
    after = set((app.work / "runs").glob("*")) if (app.work / "runs").is_dir() else set()
    assert after == before
    assert "Traceback" not in app.log.read_text()


# --- the service, in process -----------------------------------------------------------------------------


def test_public_mode_reads_no_local_folder_by_default(tmp_path: Path) -> None:
    service = Service(Settings(tmp_path / "work", public=True))
    problems, recipe = service.validate(RECIPE, str(tmp_path / "recipe.toml"))
    assert recipe is None
    assert problems[0].message == (
        f"{tmp_path / 'recipe.toml'}: '{TINY / 'base'}' is a local path, and this public app reads none; name "
        'models by their Hub id, such as "Qwen/Qwen2.5-1.5B"'
    )
    with pytest.raises(Exception, match="this public app reads none"):
        service.submit(RECIPE, str(tmp_path / "recipe.toml"), "someone")
    assert not (tmp_path / "work").exists()
    # Locally the same recipe is read as the CLI reads it.
    assert Service(Settings(tmp_path / "work")).validate(RECIPE)[0] == []


def test_public_mode_reads_local_folders_only_under_the_allowed_root(tmp_path: Path) -> None:
    service = Service(Settings(tmp_path / "work", public=True, allowed_root=TINY))
    assert service.validate(RECIPE)[0] == []
    outside = RECIPE.replace(str(TINY / "coder"), str(TINY.parent))
    problems, _ = service.validate(outside, str(tmp_path / "recipe.toml"))
    assert problems[0].message.endswith(
        f"'{TINY.parent}' is outside {TINY}, the only folder this public app reads; use a Hub id or a "
        "folder below it"
    )
    # A path that climbs out of the root through `..` is outside it too.
    climbing = RECIPE.replace(str(TINY / "coder"), str(TINY / "coder" / ".." / ".."))
    assert "is outside" in service.validate(climbing)[0][0].message


def test_cancel_midway_leaves_no_output_and_no_staging_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hubmerge.merging import engine

    write = engine.ShardWriter.write
    midway = threading.Event()
    service = Service(Settings(tmp_path / "work"))

    def held(self: engine.ShardWriter, tensor: object) -> None:
        write(self, tensor)  # type: ignore[arg-type]
        midway.set()
        job.cancel.wait(60)

    monkeypatch.setattr(engine.ShardWriter, "write", held)
    job = service.submit(RECIPE, str(tmp_path / "recipe.toml"), "me")
    assert midway.wait(60)
    staging = [p for p in (tmp_path / "work" / "runs").rglob(".recipe.hubmerge-*") if p.is_dir()]
    assert len(staging) == 1 and any(staging[0].glob("*.safetensors*"))  # a shard partly written
    assert service.cancel("someone else") is None
    assert service.cancel("me") is job
    assert job.finished.wait(60)
    assert job.state == "cancelled" and job.result is None
    assert job.error == "the merge was cancelled; the previous output, if any, was left as it was"
    assert list((tmp_path / "work" / "runs").iterdir()) == []  # no output, no staging, no empty run folder


@pytest.mark.parametrize(
    ("key", "line"),
    [
        ("parameters.threshold", 7),
        ("parameters.nothing", 5),  # an unknown key: the table it is in
        ("models[1]", 3),
        ("output.dir", None),
    ],
)
def test_key_line_finds_the_line_an_error_names(key: str, line: int | None) -> None:
    assert key_line(RECIPE, key) == line


def test_key_line_counts_array_of_tables() -> None:
    text = 'method = "linear"\n[[models]]\nsource = "a/b"\n[[models]]\nsource = "c/d"\nweight = 2\n'
    assert key_line(text, "models[1].weight") == 6
    assert key_line(text, "models[1]") == 4
    assert key_line(text, "models[0].source") == 3


# --- the form ---------------------------------------------------------------------------------------------

EXAMPLE = (TINY.parent / "tiny-ties.toml").read_text()


def test_form_reads_the_recipe_and_writes_back_only_its_own_lines() -> None:
    from hubmerge.ui.form import read_form, write_form

    form = read_form(EXAMPLE)
    assert form is not None and form.method == "ties" and form.base == "./tiny/base"
    assert form.models == ["./tiny/math", "./tiny/coder", "./tiny/instruct"]
    assert form.parameters == {"scaling_factor": 0.8, "threshold": 20}
    written = write_form(EXAMPLE, "ties", "./tiny/base", ["./tiny/math", "./tiny/coder"], {"threshold": 30.0})
    before, after = EXAMPLE.splitlines(), written.splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert changed == [
        (
            'models = ["./tiny/math", "./tiny/coder", "./tiny/instruct"]',
            'models = ["./tiny/math", "./tiny/coder"]',
        ),
        ("threshold = 20", "threshold = 30.0"),
    ]
    assert len(before) == len(after)
    # A default the recipe does not set stays unwritten; the result is a valid recipe.
    assert write_form(EXAMPLE, "ties", "./tiny/base", form.models, {"trim": "global"}) == EXAMPLE
    loads_recipe(written, TINY.parent / "tiny-ties.toml")


def test_form_adds_parameters_and_leaves_tables_and_schedules_alone() -> None:
    from hubmerge.ui.form import read_form, write_form

    text = (
        '# mine\nmethod = "linear"\n[[models]]\nsource = "a/b"\nweight = 2\n[parameters]\nweight = [0, 1]\n'
    )
    form = read_form(text)
    assert form is not None and form.models is None and form.parameters == {"weight": [0, 1]}
    written = write_form(text, "linear", "", None, {"normalize": False})
    assert written == text.replace("weight = [0, 1]\n", "weight = [0, 1]\nnormalize = false\n")
    assert write_form('method = "ties"\n', "simple_average", "", ["x/y"], {}) == (
        'method = "simple_average"\nmodels = ["x/y"]\n'
    )
    assert read_form("method = [") is None


def test_form_fields_are_the_registrys() -> None:
    from hubmerge.merging.methods import METHODS
    from hubmerge.ui.form import FIELDS, fields_of

    for method in METHODS.values():
        for param in fields_of(method):
            assert FIELDS[param.name].type is param.type and FIELDS[param.name].choices == param.choices
    assert [p.name for p in fields_of(METHODS["ties"])] == [
        "scaling_factor",
        "threshold",
        "merge_func",
        "trim",
    ]


def test_merge_cancelled_before_it_starts_writes_nothing(tmp_path: Path) -> None:
    from hubmerge.api import merge
    from hubmerge.errors import Cancelled

    cancel = threading.Event()
    cancel.set()
    recipe = loads_recipe(RECIPE, tmp_path / "recipe.toml")
    with pytest.raises(Cancelled, match="the merge was cancelled"):
        merge(recipe, output_dir=tmp_path / "out", cancel=cancel, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_one_merge_at_a_time_the_next_one_waits_in_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hubmerge.merging import engine

    write = engine.ShardWriter.write
    midway = threading.Event()
    service = Service(Settings(tmp_path / "work"))

    def held(self: engine.ShardWriter, tensor: object) -> None:
        write(self, tensor)  # type: ignore[arg-type]
        if first.state == "running":
            midway.set()
            first.cancel.wait(60)

    monkeypatch.setattr(engine.ShardWriter, "write", held)
    first = service.submit(RECIPE, str(tmp_path / "first.toml"), "a")
    assert midway.wait(60)
    second = service.submit(RECIPE, str(tmp_path / "second.toml"), "b")
    assert second.state == "waiting"
    assert service.queue_status() == f"running first.toml (job {first.id}); 1 waiting"
    assert service.cancel("a") is first
    assert second.finished.wait(60) and first.finished.is_set()
    assert (first.state, second.state) == ("cancelled", "done")
    assert second.result is not None and (second.result.output_dir / "model.safetensors").is_file()
    assert service.results == {"b": second.result}
    assert service.queue_status() == "idle; 0 waiting"


def test_run_folders_carry_an_unguessable_part_since_gradio_serves_the_work_folder(tmp_path: Path) -> None:
    service = Service(Settings(work_dir=tmp_path))
    example = REPO / "recipes" / "examples" / "tiny-ties.toml"
    recipe = loads_recipe(example.read_text(), example)
    first, second = (service._output(1, recipe).parent.name, service._output(1, recipe).parent.name)
    assert first != second  # same second, same number: only the random part differs
    assert all(re.fullmatch(r"\d{8}-\d{6}-1-[0-9a-f]{32}", name) for name in (first, second))


# --- progress, [eval] and search through the app's service -------------------------------------------------


def test_progress_reports_bytes_and_tensors_in_the_order_they_are_written(tmp_path: Path) -> None:
    from hubmerge.api import MergeProgress, merge
    from hubmerge.ui.app import progress_text
    from hubmerge.ui.service import Job

    reports: list[MergeProgress] = []
    recipe = loads_recipe(RECIPE, tmp_path / "recipe.toml")
    result = merge(
        recipe, output_dir=tmp_path / "out", stats=False, log=lambda _: None, progress=reports.append
    )
    total = result.plan.output_bytes
    assert [(p.total, p.tensors, p.fetched, p.uploaded) for p in reports] == [(total, 26, None, None)] * len(
        reports
    )
    # One slice per tiny tensor: each report is one more tensor, and the bytes of the tensors so far.
    assert [p.tensors_done for p in reports] == list(range(1, 27))
    sizes = [t.numel * 2 for t in result.plan.tensors]  # bfloat16
    by_name = dict(zip((t.name for t in result.plan.tensors), sizes, strict=True))
    order = [name for layout in result.plan.shards for name, _ in layout.tensors]
    assert [p.written for p in reports] == list(itertools.accumulate(by_name[n] for n in order))
    assert reports[-1].written == total
    job = Job("1", "me", "recipe.toml", progress=reports[9])
    assert progress_text(job, 12.4) == (
        f"merging recipe.toml: out {reports[9].written / 1e6:,.2f} MB of {total / 1e6:,.2f} MB "
        f"({reports[9].written / total:.0%}), 10 of 26 tensors, sources read from the disk, about 12 s left"
    )
    streamed = Job(
        "2", "me", "r.toml", progress=dataclasses.replace(reports[-1], fetched=3_500_000, uploaded=10**6)
    )
    assert progress_text(streamed, None).endswith("26 of 26 tensors, in 3.50 MB from the Hub, up 1.00 MB")


@pytest.fixture
def lm_eval_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """lm-eval reads the tiny task's data relative to the repository root, offline (as tests/test_eval.py)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_merge_from_the_app_runs_the_recipes_eval_and_its_card_shows_the_table(
    tmp_path: Path, lm_eval_offline: None
) -> None:
    from hubmerge.quality.evaluate import RESULTS_FILE
    from hubmerge.ui.app import page_card
    from hubmerge.ui.service import card_markdown

    tasks = REPO / "tests" / "data" / "lm_eval"
    text = (
        RECIPE
        + f'\n[eval]\ntasks = ["hubmerge_tiny"]\ninclude_path = "{tasks}"\nlimit = 8\nbatch_size = 8\nsources = false\n'
    )
    service = Service(Settings(tmp_path / "work"))
    job = service.submit(text, str(tmp_path / "recipe.toml"), "me")
    assert job.finished.wait(300)
    assert job.state == "done", job.error
    assert job.result is not None and job.result.evaluation is not None
    acc = json.loads((job.result.output_dir / RESULTS_FILE).read_text())["lm_eval"]["models"][0]["results"]
    card = page_card(card_markdown(job.result), job.result.output_dir)
    assert "## Evaluation" in card
    row = next(line for line in card.splitlines() if line.startswith("| hubmerge_tiny | `acc,none`"))
    assert f"**{acc['hubmerge_tiny']['acc,none']['value']:.4f}**" in row


SEARCH = RECIPE + (
    '\n[search]\nsampler = "grid"\ntrials = 10\n[search.space]\n'
    '"parameters.scaling_factor" = { low = 0.5, high = 1.0, step = 0.5 }\n'
)


def test_a_search_from_the_app_runs_its_trials_and_shows_the_best(tmp_path: Path) -> None:
    from hubmerge.ui.app import best_markdown, progress_html, trials_table

    service = Service(Settings(tmp_path / "work"))
    with pytest.raises(Exception, match=r"plain.toml: no \[search\] table; add one"):
        service.submit(RECIPE, str(tmp_path / "plain.toml"), "me", kind="search")
    job = service.submit(SEARCH, str(tmp_path / "recipe.toml"), "me", kind="search")
    assert job.finished.wait(300)
    assert job.state == "done", job.error
    results = job.search_results()
    assert results is not None and job.search is not None
    assert results["trials"] == list(job.search.trials)
    scores = {t["params"]["parameters.scaling_factor"]: t["score"] for t in results["trials"]}
    assert sorted(scores) == [0.5, 1.0]  # the grid bounds the budget: 2 of 10
    best = min(scores, key=lambda v: scores[v])  # the loss: minimized
    header, rows = trials_table(results)
    assert header == ["trial", "state", "score", "parameters.scaling_factor", "seconds", "error"]
    assert sorted((row[3], row[1], row[2]) for row in rows) == sorted(
        (v, "complete", s) for v, s in scores.items()
    )
    shown = best_markdown(results)
    assert shown.startswith(
        f"**best so far: trial {results['best']['number']}**, score {scores[best]:.6g} (minimized)"
    )
    assert f"`parameters.scaling_factor = {best!r}`" in shown
    assert (job.output / "best.toml").is_file() and job.output.parent.parent == tmp_path / "work" / "runs"
    assert "done: the search of recipe.toml" in progress_html(job, service.queue_status())
    assert service.results == {}  # a search leaves nothing to push


def test_a_cancelled_search_runs_no_trial_after_the_running_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hubmerge.search import run

    service = Service(Settings(tmp_path / "work"))
    real = run.run_trial

    def cancelled_during_the_first(trial: run.TrialJob) -> dict[str, object]:
        assert service.queue_status() == f"searching recipe.toml (job {service.running.id}); 0 waiting"  # type: ignore[union-attr]
        service.cancel("me")
        return real(trial)

    monkeypatch.setattr(run, "run_trial", cancelled_during_the_first)
    job = service.submit(
        SEARCH.replace('sampler = "grid"', 'sampler = "random"'),
        str(tmp_path / "recipe.toml"),
        "me",
        kind="search",
    )
    assert job.finished.wait(300)
    assert job.state == "cancelled"
    results = job.search_results()
    assert results is not None and [t["state"] for t in results["trials"]] == ["complete"]
    assert service.queue_status() == "idle; 0 waiting"
