"""The web app's named endpoints through `gradio_client` against `hubmerge ui` on 127.0.0.1 (`/validate`,
`/plan`, `/merge`), and what the app's service guarantees without a browser: the public mode's refusal of
local folders, a cancel that leaves nothing behind, errors at their recipe line."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, TINY
from gradio_client import Client
from gradio_client.exceptions import AppError
from uiapp import Served, serve

from hubmerge.cli import main
from hubmerge.recipe import loads_recipe
from hubmerge.ui.service import Service, Settings, key_line

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
    from hubmerge import engine

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
    from hubmerge.methods import METHODS
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
    from hubmerge import engine

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
