"""Nothing of the user's lost, nothing leaked, nothing half-done: the output guard, the lock, the push's
deletions, token scopes, and what the command line prints. Real CLI subprocesses and the local Hub."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from support.checkpoints import REPO, TINY, random_state_dict, write_checkpoint
from support.cli import invoke_cli
from support.hub import POOL, hub_env, local_hub
from support.hubserver import LocalHub

from hubmerge.publish import output

LOCAL = 'method = "task_arithmetic"\nbase = "./base"\nmodels = ["./a"]\n'


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    for name, seed in (("base", 0), ("a", 1)):
        write_checkpoint(tmp_path / name, random_state_dict(seed))
    return tmp_path


def _recipe(folder: Path, text: str = LOCAL, name: str = "recipe.toml") -> Path:
    (folder / name).write_text(text)
    return folder / name


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".hubmerge-" in p.name)


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert all(line.startswith("warning: ") for line in lines[:-1]), stderr
    assert lines[-1].startswith("hubmerge: error: ") and "Traceback" not in stderr, stderr
    return lines[-1]


# --- the output guard ----------------------------------------------------------------------------------


def test_output_dot_in_a_project_holding_hubmerge_toml_is_refused_and_nothing_moves(pool: Path) -> None:
    project = pool / "project"
    (project / ".git").mkdir(parents=True)
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (project / "train.py").write_text("print('mine')\n")
    for name in ("base", "a"):
        shutil.copytree(pool / name, project / name)
    recipe = _recipe(project, name="hubmerge.toml")  # the name every merged repo's clone holds
    before = sorted(p.relative_to(project).as_posix() for p in project.rglob("*"))
    for target in (".", "..", str(project)):
        result = invoke_cli(recipe, "--output", target, cwd=project)
        assert result.returncode == 1, result.stderr
        assert "is the current directory, one of its parents" in _one_error_line(result.stderr)
    assert sorted(p.relative_to(project).as_posix() for p in project.rglob("*")) == before
    assert _leftovers(project.parent) == [] and _leftovers(project) == []


def test_folder_with_hubmerge_toml_but_no_valid_lock_is_not_taken_for_an_output(pool: Path) -> None:
    recipe = _recipe(pool)
    clone = pool / "clone"
    clone.mkdir()
    (clone / "hubmerge.toml").write_text(LOCAL)
    (clone / "notes.md").write_text("mine")
    for lock in (None, "{not json", json.dumps({"output": {"files": {}}})):  # missing, broken, not ours
        if lock is not None:
            (clone / "hubmerge.lock.json").write_text(lock)
        result = invoke_cli(recipe, "--output", clone)
        assert result.returncode == 1
        assert "is not a hubmerge output (no valid hubmerge.lock.json)" in _one_error_line(result.stderr)
        assert (clone / "notes.md").read_text() == "mine"


def test_output_path_that_is_a_file_gets_one_clear_line(pool: Path) -> None:
    (pool / "taken").write_text("a file")
    result = invoke_cli(_recipe(pool), "--output", pool / "taken")
    assert result.returncode == 1
    assert "taken is a file, not a folder" in _one_error_line(result.stderr)
    assert (pool / "taken").read_text() == "a file"
    (pool / "link").symlink_to(pool / "base")
    linked = invoke_cli(_recipe(pool), "--output", pool / "link")
    # The recipe resolves links: the guard judges the folder the link points to.
    assert linked.returncode == 1 and "base exists and is not a hubmerge output" in _one_error_line(
        linked.stderr
    )
    assert (pool / "base" / "model.safetensors").is_file()


def test_rerun_refuses_files_the_user_added_and_names_them(pool: Path) -> None:
    recipe = _recipe(pool)
    assert invoke_cli(recipe, "--output", pool / "out", "-q").returncode == 0
    (pool / "out" / "eval").mkdir()
    (pool / "out" / "eval" / "scores.json").write_text("{}")
    (pool / "out" / "notes.md").write_text("mine")
    (pool / "out" / "empty").mkdir()
    (pool / "out" / "data").symlink_to(pool / "base")
    result = invoke_cli(recipe, "--output", pool / "out")
    assert result.returncode == 1
    line = _one_error_line(result.stderr)
    assert "does not list as written by hubmerge (data, empty, eval/scores.json, notes.md)" in line
    assert (pool / "out" / "notes.md").read_text() == "mine"
    # A file hubmerge wrote but someone changed is not ours to replace either.
    for extra in ("notes.md", "data"):
        (pool / "out" / extra).unlink()
    for folder in ("eval", "empty"):
        shutil.rmtree(pool / "out" / folder)
    with open(pool / "out" / "config.json", "a") as f:
        f.write(" ")
    assert "(config.json)" in _one_error_line(invoke_cli(recipe, "--output", pool / "out").stderr)


def test_rerun_replaces_its_own_output_and_leaves_no_temporary_folder(pool: Path) -> None:
    recipe = _recipe(pool)
    assert invoke_cli(recipe, "--output", pool / "out", "-q").returncode == 0
    first = (pool / "out" / "model.safetensors").read_bytes()
    _recipe(pool, LOCAL + "[parameters]\nscaling_factor = 0.5\n")
    assert invoke_cli(recipe, "--output", pool / "out", "-q").returncode == 0
    assert (pool / "out" / "model.safetensors").read_bytes() != first
    assert _leftovers(pool) == []
    assert output.MARKER not in os.listdir(pool / "out")


def _fake_output(folder: Path, weights: bytes = b"w" * 10) -> None:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(weights)
    lock = {"hubmerge_version": "0.1.0", "output": {"files": {"model.safetensors": {"size": len(weights)}}}}
    (folder / "hubmerge.lock.json").write_text(json.dumps(lock))


def test_recover_puts_back_an_output_moved_aside_by_a_run_that_died_mid_swap(tmp_path: Path) -> None:
    _fake_output(tmp_path / ".out.hubmerge-old-k3j2", b"previous")
    output.recover(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"previous"
    assert _leftovers(tmp_path) == []


def test_recover_drops_dead_staging_and_leaves_what_it_cannot_prove_is_its_own(tmp_path: Path) -> None:
    _fake_output(tmp_path / "out", b"current")
    _fake_output(tmp_path / ".out.hubmerge-dead1")  # complete-looking, but a staging folder: never an output
    (tmp_path / ".out.hubmerge-dead1" / output.MARKER).touch()
    (tmp_path / ".out.hubmerge-mine").mkdir()  # no marker: not provably hubmerge's
    (tmp_path / ".out.hubmerge-mine" / "x").write_text("x")
    _fake_output(tmp_path / ".out.hubmerge-old-done")  # swap finished, removal did not: old copy goes
    (tmp_path / ".out.hubmerge-live").mkdir()
    with open(tmp_path / ".out.hubmerge-live" / output.MARKER, "wb") as live:
        fcntl.flock(live, fcntl.LOCK_EX)  # a run still writing holds its marker locked
        output.recover(tmp_path / "out")
    assert _leftovers(tmp_path) == [".out.hubmerge-live", ".out.hubmerge-mine"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"current"


# --- the lock ------------------------------------------------------------------------------------------


def test_lock_records_torch_and_device_and_no_absolute_path_is_published(pool: Path) -> None:
    recipe = _recipe(pool)
    assert invoke_cli(recipe, "--output", pool / "out", "-q").returncode == 0
    lock = json.loads((pool / "out" / "hubmerge.lock.json").read_text())
    assert (lock["torch_version"], lock["device"]) == (torch.__version__, "cpu")
    assert [s["path"] for s in lock["sources"]] == ["base", "a"]
    for path in (pool / "out").iterdir():
        assert str(pool).encode() not in path.read_bytes(), path.name


@pytest.mark.slow
def test_lock_that_does_not_reproduce_fails_saying_what_differs(pool: Path) -> None:
    recipe = _recipe(pool)
    assert invoke_cli(recipe, "--output", pool / "a-out", "-q").returncode == 0
    lock = json.loads((pool / "a-out" / "hubmerge.lock.json").read_text())
    lock["torch_version"] = "1.0.0"
    lock["output"]["files"]["model.safetensors"]["sha256"] = "0" * 64
    (pool / "edited.lock.json").write_text(json.dumps(lock))
    result = invoke_cli(recipe, "--output", pool / "b-out", "--lock", pool / "edited.lock.json")
    assert result.returncode == 1
    line = _one_error_line(result.stderr)
    assert "model.safetensors differ (torch 1.0.0 then, " + torch.__version__ + " now)" in line
    assert not (pool / "b-out").exists() and _leftovers(pool) == []
    # The unedited lock reproduces.
    again = invoke_cli(
        recipe, "--output", pool / "b-out", "-q", "--lock", pool / "a-out" / "hubmerge.lock.json"
    )
    assert again.returncode == 0, again.stderr


TEMPLATE = "---\n{{ front_matter }}\n---\n# {{ title }}\n\nFrom {{ recipe.file }}.\n"


def test_reproduce_command_from_the_output_folder_works_with_a_card_template(pool: Path) -> None:
    (pool / "cards").mkdir()
    (pool / "cards" / "card.md.j2").write_text(TEMPLATE)
    text = (
        f'method = "task_arithmetic"\nbase = "{pool / "base"}"\nmodels = ["{pool / "a"}"]\n'
        '[card]\ntemplate = "cards/card.md.j2"\n'
    )
    recipe = _recipe(pool, text, name="my-merge.toml")
    out = pool / "out"
    assert invoke_cli(recipe, "--output", out, "-q").returncode == 0
    assert (out / "cards" / "card.md.j2").read_text() == TEMPLATE
    # The command the default card prints, run where a user who cloned the repo would run it.
    result = invoke_cli(
        "hubmerge.toml", "--lock", "hubmerge.lock.json", "--output", "reproduced", "--no-push", cwd=out
    )
    assert result.returncode == 0, result.stderr
    assert (out / "reproduced" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    card = (out / "reproduced" / "README.md").read_text()
    assert "# my-merge\n" in card and "From my-merge.toml." in card  # the original name, not hubmerge.toml
    lock = json.loads((out / "reproduced" / "hubmerge.lock.json").read_text())
    assert lock["recipe"]["file"] == "my-merge.toml"


@pytest.mark.parametrize("command", [(), ("plan",), ("card",)])
def test_card_template_outside_the_recipe_folder_is_refused(pool: Path, command: tuple[str, ...]) -> None:
    (pool / "elsewhere.j2").write_text(TEMPLATE)
    (pool / "recipes").mkdir()
    for name in ("base", "a"):
        shutil.copytree(pool / name, pool / "recipes" / name)
    recipe = _recipe(pool / "recipes", LOCAL + '[card]\ntemplate = "../elsewhere.j2"\n')
    result = invoke_cli(*command, recipe, "--output", pool / "out")
    assert result.returncode == 2
    assert "card.template" in _one_error_line(result.stderr)
    assert "is outside the recipe's folder" in result.stderr
    assert not (pool / "out").exists()


def test_validate_refuses_a_card_template_outside_the_recipe_folder(pool: Path) -> None:
    """The pull-request check (`hubmerge validate`) says it before any merge would."""
    (pool / "elsewhere.j2").write_text(TEMPLATE)
    (pool / "recipes").mkdir()
    for name in ("base", "a"):
        shutil.copytree(pool / name, pool / "recipes" / name)
    recipe = _recipe(pool / "recipes", LOCAL + '[card]\ntemplate = "../elsewhere.j2"\n')
    result = invoke_cli("validate", recipe)
    assert result.returncode == 2
    assert _one_error_line(result.stderr).endswith(
        f"card.template: {pool / 'elsewhere.j2'} is outside the recipe's folder; keep the template beside the "
        "recipe or below it"
    )


def test_remote_code_auto_map_is_dropped_from_the_output_config_with_a_warning(tmp_path: Path) -> None:
    auto_map = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    write_checkpoint(tmp_path / "base", random_state_dict(0), auto_map=auto_map)
    write_checkpoint(tmp_path / "a", random_state_dict(1))
    result = invoke_cli(_recipe(tmp_path), "--output", tmp_path / "out", "-q")
    assert result.returncode == 0, result.stderr
    assert "config.json has auto_map (remote code); left out of the output" in result.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == "qwen2"


# --- what the command line prints ----------------------------------------------------------------------


def test_library_merge_does_not_push_unless_asked(pool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hubmerge

    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a push would need the network: it would fail here
    recipe = _recipe(pool, LOCAL + '[output]\nrepo = "user/never-pushed"\n')
    result = hubmerge.merge(recipe, output_dir=pool / "out", quiet=True, log=lambda _: None)
    assert result.commit_url is None and (pool / "out" / "model.safetensors").is_file()
    with pytest.raises(hubmerge.PublishError, match="needs a Hugging Face token"):
        hubmerge.merge(recipe, output_dir=pool / "out2", push=True, quiet=True, log=lambda _: None)


def test_hubmerge_never_unpickles_nor_trusts_remote_code() -> None:
    source = {p.name: p.read_text() for p in (REPO / "hubmerge").rglob("*.py")}
    forbidden = re.compile(
        r"import pickle|from pickle|torch\.load\(|weights_only\s*=\s*False|trust_remote_code\s*=\s*(?!False\b)|"
        r"(?<![\w.])eval\(|(?<![\w.])exec\(|import marshal|import dill"
    )
    assert {name: forbidden.findall(text) for name, text in source.items() if forbidden.search(text)} == {}
    # Where remote code could be asked for, it is refused explicitly (transformers and lm-eval default to
    # refusing too, but a default can change).
    assert (
        "trust_remote_code=False" in source["sanity.py"]
        and "trust_remote_code=False" in source["evaluate.py"]
    )


# --- the Hub: deletions, token scopes, and the token itself --------------------------------------------


@pytest.fixture(scope="module")
def hub() -> Iterator[LocalHub]:
    with local_hub({repo: TINY / name for repo, name in POOL.items()}, orgs=("user-org",)) as server:
        yield server


@pytest.mark.slow
def test_push_deletes_files_an_older_output_wrote_and_keeps_the_users_own(hub: LocalHub, pool: Path) -> None:
    hub.create_repo("user/managed")
    recipe = _recipe(pool, LOCAL + '[output]\nrepo = "user/managed"\n')
    assert invoke_cli(recipe, "--output", pool / "out", env=hub_env(hub, pool)).returncode == 0
    assert "chat_template.jinja" in hub.files("user/managed")
    hub.commit("user/managed", {"notes.md": b"mine", "eval/scores.json": b"{}"}, "user's own files")
    (pool / "base" / "chat_template.jinja").unlink()  # a new tokenizer without a chat template
    result = invoke_cli(recipe, "--output", pool / "out", env=hub_env(hub, pool))
    assert result.returncode == 0, result.stderr
    files = hub.files("user/managed")
    assert "chat_template.jinja" not in files
    assert files["notes.md"] == b"mine" and files["eval/scores.json"] == b"{}"
    assert files["model.safetensors"] == (pool / "out" / "model.safetensors").read_bytes()
    # An identical re-push makes no commit. The client logs a warning about it, which the one-line contract
    # keeps off stderr (HUBMERGE_DEBUG lets library logs through, which shows the line is really there).
    commits = len(hub.commits("user/managed"))
    debug = subprocess.run(
        [sys.executable, "-m", "hubmerge.cli", recipe, "--output", pool / "out", "-q"],
        env={**os.environ, **hub_env(hub, pool), "HUBMERGE_DEBUG": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "No files have been modified since last commit" in debug.stderr
    again = invoke_cli(recipe, "--output", pool / "out", "-q", env=hub_env(hub, pool))
    assert again.returncode == 0
    assert again.stderr == "user/managed already holds exactly this output; no new commit was made\n"
    assert len(hub.commits("user/managed")) == commits


@pytest.mark.parametrize(
    ("scoped", "repo", "allowed"),
    [
        ({"user": ["repo.content.read"]}, "user/fg-read", False),
        ({"user-org": ["repo.write"]}, "user/fg-other-namespace", False),
        ({"user/fg-repo": ["repo.content.read", "repo.write"]}, "user/fg-repo", True),
        ({"user-org": ["repo.content.read", "repo.write"]}, "user-org/fg-new", True),
    ],
)
def test_fine_grained_token_scopes_are_checked_before_merging(
    hub: LocalHub, pool: Path, scoped: dict[str, list[str]], repo: str, allowed: bool
) -> None:
    token = f"hf_fg_{abs(hash(repo))}"
    hub.add_fine_grained_token("user", token, scoped)
    if repo == "user/fg-repo":
        hub.create_repo(repo)
    recipe = _recipe(pool, LOCAL + f'[output]\nrepo = "{repo}"\n')
    result = invoke_cli(recipe, "--output", pool / "out", env=hub_env(hub, pool, token=token))
    if allowed:
        assert result.returncode == 0, result.stderr
        assert "model.safetensors" in hub.files(repo)
    else:
        assert result.returncode == 6
        assert f"has no write permission for {repo}" in _one_error_line(result.stderr)
        assert not (pool / "out").exists()


def test_a_sentinel_token_appears_in_no_output_of_any_command(hub: LocalHub, pool: Path) -> None:
    sentinel = "hf_SENTINEL_never_print_me_0123456789"
    hub.add_user("user", sentinel, orgs=("user-org",))
    recipe = _recipe(pool, LOCAL + '[output]\nrepo = "user/sentinel"\n')
    foreign = _recipe(pool, LOCAL + '[output]\nrepo = "Qwen/not-yours"\n', name="foreign.toml")
    hub_recipe = _recipe(
        pool,
        'method = "task_arithmetic"\nbase = "Qwen/Qwen2.5-1.5B"\nmodels = ["Qwen/nope"]\n',
        "missing.toml",
    )
    summary = pool / "summary.md"
    env = hub_env(hub, pool, token=sentinel, GITHUB_STEP_SUMMARY=str(summary))
    runs = [
        (("validate", recipe), 0),
        (("plan", recipe), 0),
        (("plan", recipe, "--json"), 0),
        (("card", recipe), 0),
        ((recipe, "--dry-run"), 0),
        ((recipe, "--output", pool / "out"), 0),
        ((foreign, "--output", pool / "out2"), 6),
        ((hub_recipe, "--output", pool / "out3"), 3),
    ]
    for args, code in runs:
        result = invoke_cli(*args, env=env)
        assert result.returncode == code, (args, result.stderr)
        assert sentinel not in result.stdout + result.stderr, args
    assert "user/sentinel" in summary.read_text() and sentinel not in summary.read_text()
    written = [p for p in (pool / "out").rglob("*") if p.is_file()]
    assert len(written) >= 8 and all(sentinel.encode() not in p.read_bytes() for p in written)
    assert all(sentinel.encode() not in data for data in hub.files("user/sentinel").values())


def test_job_summary_escapes_markup_from_recipes_and_hub_metadata(tmp_path: Path) -> None:
    hostile = "m`<img src=x onerror=alert(1)>|[x](javascript:evil)"
    write_checkpoint(tmp_path / "base", random_state_dict(0))
    write_checkpoint(tmp_path / hostile, random_state_dict(1), max_position_embeddings=1024)
    (tmp_path / "base" / "config.json").write_text(
        json.dumps(
            json.loads((tmp_path / "base" / "config.json").read_text()) | {"rope_theta": "<b>|`x`</b>"}
        )
    )
    recipe = _recipe(tmp_path, f'method = "task_arithmetic"\nbase = "./base"\nmodels = ["./{hostile}"]\n')
    summary = tmp_path / "summary.md"
    result = invoke_cli("plan", recipe, "--summary", summary)
    assert result.returncode == 0, result.stderr
    text = summary.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| models[0] |"))
    assert re.sub(r"\\\|", "", row).count("|") == 5  # four cells: no `|` from the name splits the table
    assert "m'<img src=x onerror=alert(1)>\\|[x](javascript:evil)` |" in row  # inside a code span: inert
    warnings = [line for line in text.splitlines() if line.startswith("> warning:")]
    assert warnings and all("<b>" not in w and "`" not in w.replace("\\`", "") for w in warnings)
    assert "\\<b\\>" in "".join(warnings)


def test_home_folder_is_refused_as_output(pool: Path) -> None:
    home = pool / "home"
    home.mkdir()
    (home / ".bashrc").write_text("mine")
    result = invoke_cli(_recipe(pool), "--output", home, env={"HOME": str(home)})
    assert result.returncode == 1
    assert "or your home folder" in _one_error_line(result.stderr)
    assert sorted(os.listdir(home)) == [".bashrc"]
