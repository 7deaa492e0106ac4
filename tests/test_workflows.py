"""The GitHub workflows and composite action that hubmerge ships, checked offline.

The linters a GitHub user would run on them (the schemas, actionlint, zizmor); the changed-recipe
detection against real git histories; and the jobs of merge.yml and search.yml executed as a runner
would, against the local Hub: every `run:` step in order, with bash, its `env:` evaluated from the job's
contexts, and the runner's files (`GITHUB_OUTPUT` per step, `GITHUB_STEP_SUMMARY`). Steps that `uses:`
an action and the step with `id: install` are skipped: the checkout is the temporary workspace, and this
interpreter already has hubmerge installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.checkpoints import REPO, TINY
from support.cli import process_like
from support.hub import POOL, TOKEN, hub_env, local_hub
from support.hubserver import LocalHub

BIN = Path(sys.executable).parent
WORKFLOWS = REPO / ".github" / "workflows"
MERGE_YML = WORKFLOWS / "merge.yml"
ACTION_YML = REPO / "action.yml"
DETECT = REPO / ".github" / "scripts" / "changed-recipes.sh"
ZERO_SHA = "0" * 40
# GitHub's command line for `shell: bash`.
BASH = ["bash", "--noprofile", "--norc", "-eo", "pipefail"]
SOURCE_OF = {name: repo for repo, name in POOL.items()}  # "base" -> "Qwen/Qwen2.5-1.5B"


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable} (pip install -e '.[test]')")
    return str(path)


def _workflow_files() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.yml"))


def _runner_env(**values: str) -> dict[str, str]:
    """This process's environment without anything a real runner (or the Hub client) would have set."""
    prefixes = ("GITHUB_", "RUNNER_", "ACTIONS_", "HF_", "HUGGING_FACE_", "HUBMERGE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes) or k == "HUBMERGE_CACHE"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env | values


# ---------------------------------------------------------------------------------------------- linters


@pytest.mark.slow
def test_workflows_and_action_match_githubs_schemas() -> None:
    check = _tool("check-jsonschema")
    for schema, files in (("vendor.github-workflows", _workflow_files()), ("vendor.github-actions", [ACTION_YML])):
        result = subprocess.run([check, "--builtin-schema", schema, *map(str, files)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "ok -- validation done" in result.stdout


def test_actionlint_reports_nothing() -> None:
    # actionlint also runs shellcheck on every `run:` when shellcheck is installed; it does not need it.
    result = subprocess.run([_tool("actionlint"), "-no-color", *map(str, _workflow_files())],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, ""), result.stdout + result.stderr


def test_zizmor_offline_finds_nothing_above_low() -> None:
    result = subprocess.run([_tool("zizmor"), "--offline", "--format", "json", *map(str, _workflow_files()),
                             str(ACTION_YML)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 11, 12), result.stderr  # 11, 12: informational or low findings only
    findings = json.loads(result.stdout)
    above_low = [(f["ident"], f["determinations"]["severity"]) for f in findings
                 if f["determinations"]["severity"] not in ("Informational", "Low")]
    assert above_low == []


def test_actions_are_pinned_by_commit_to_node24_majors() -> None:
    minimum = {"actions/checkout": 5, "actions/setup-python": 6, "actions/cache": 5}
    pins = []
    for path in [*_workflow_files(), ACTION_YML]:
        for line in path.read_text().splitlines():
            if not re.match(r"\s*(- )?uses:", line):
                continue
            match = re.search(r"uses: ([\w.-]+/[\w.-]+)@([0-9a-f]{40}) # v(\d+)\.\d+\.\d+$", line)
            assert match, f"{path.name}: not pinned to a commit with a version comment: {line.strip()}"
            action, _, major = match.groups()
            assert int(major) >= minimum.get(action, 0), line
            pins.append(action)
    assert {"actions/checkout", "actions/setup-python"} <= set(pins)


def _steps(path: Path) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    jobs = [doc["runs"]] if "runs" in doc else doc["jobs"].values()
    return [step for job in jobs for step in job["steps"]]


def test_pull_request_side_of_merge_yml_gets_no_secrets_and_reads_only() -> None:
    workflow = yaml.safe_load(MERGE_YML.read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    assert set(triggers) == {"pull_request", "push", "workflow_dispatch"}  # never pull_request_target
    assert triggers["pull_request"]["paths"] == triggers["push"]["paths"] == ["recipes/**.toml"]
    assert workflow["permissions"] == {}
    jobs = workflow["jobs"]
    assert jobs["check"]["permissions"] == jobs["recipes"]["permissions"] == {"contents": "read"}
    assert "secrets." not in yaml.safe_dump(jobs["check"]) + yaml.safe_dump(jobs["recipes"])
    assert "needs.recipes.outputs.count != '0'" in jobs["check"]["if"]


def test_merge_job_publishes_from_main_one_run_per_recipe_and_never_on_an_empty_matrix() -> None:
    jobs = yaml.safe_load(MERGE_YML.read_text())["jobs"]
    auth = jobs["auth"]
    assert "github.ref == 'refs/heads/main'" in auth["if"]
    assert "needs.recipes.outputs.count != '0'" in auth["if"]  # fromJSON('[]') would fail the run
    assert auth["permissions"] == {} and "uses" not in yaml.safe_dump(auth["steps"])  # no checkout: no PR code
    for name, kind in (("merge", "token"), ("merge-oidc", "oidc")):
        merge = jobs[name]
        assert merge["needs"] == ["recipes", "auth"] and merge["if"] == f"needs.auth.outputs.kind == '{kind}'"
        assert merge["concurrency"] == {"group": "hubmerge-merge-${{ matrix.recipe }}", "cancel-in-progress": False}
        assert merge["strategy"]["matrix"] == {"recipe": "${{ fromJSON(needs.recipes.outputs.recipes) }}"}
    # Only the job that runs without a token secret may mint an OIDC token, and it never sees the secret.
    assert jobs["merge"]["permissions"] == {"contents": "read"}
    assert jobs["merge-oidc"]["permissions"] == {"contents": "read", "id-token": "write"}
    assert "secrets." not in yaml.safe_dump(jobs["merge-oidc"])
    assert [n for n, job in jobs.items() if "id-token" in job.get("permissions", {})] == ["merge-oidc"]


@pytest.mark.parametrize(("secret", "kind"), [(TOKEN, "token"), ("", "oidc")])
def test_auth_job_picks_the_token_job_only_when_the_secret_is_set(tmp_path: Path, secret: str, kind: str) -> None:
    job = Job(MERGE_YML, "auth", tmp_path, {"secrets": {"HF_TOKEN": secret}}, _runner_env())
    assert job.run() == 0
    assert job.contexts["steps"]["kind"]["outputs"] == {"kind": kind}
    assert secret == "" or secret not in job.log("Token or trusted publishing")


def test_no_run_step_expands_expressions_and_no_checkout_keeps_credentials() -> None:
    steps = [step for path in [*_workflow_files(), ACTION_YML] for step in _steps(path)]
    runs = [step["run"] for step in steps if "run" in step]
    checkouts = [step for step in steps if step.get("uses", "").startswith("actions/checkout@")]
    assert len(runs) == 22 and len(checkouts) == 8
    assert [run for run in runs if "${{" in run] == []
    assert all(step["with"]["persist-credentials"] is False for step in checkouts)


# --------------------------------------------------------------------------------- installs and tokens

SCRIPTS = REPO / ".github" / "scripts"
REQUIREMENTS = REPO / ".github" / "requirements"
_SCRIPT = re.compile(r"(?:\.github/scripts/|\$\(dirname \"\$0\"\)/)([\w-]+\.sh)")
# The two installs that cannot be hashed, each with --no-deps so that nothing else comes in through them:
# PyTorch's CPU wheel, pinned, from PyTorch's index (PyPI has no CPU-only Linux wheel to compile a hash
# from), and hubmerge itself as HUBMERGE_SPEC names it (the checked-out commit, or a pinned release).
_UNHASHED = [
    "python -m pip install --progress-bar off --no-deps \"torch==$torch_version\" --index-url https://download.pytorch.org/whl/cpu",
    'python -m pip install --progress-bar off --no-deps --no-build-isolation "$HUBMERGE_SPEC"',
]


def _scripts_run_by(text: str, seen: frozenset[str] = frozenset()) -> list[str]:
    """The scripts in .github/scripts/ that `text` runs or sources, and the ones they do, transitively."""
    found = []
    for name in _SCRIPT.findall(text):
        if name not in seen:
            seen |= {name}
            found += [name, *_scripts_run_by((SCRIPTS / name).read_text(), seen)]
    return found


def _pip_installs(text: str) -> list[str]:
    lines = text.replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in lines if re.search(r"\bpip3? install\b", line)]


def _jobs() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, job, environment shared by its steps) for every job of the workflows and for action.yml."""
    jobs = []
    for path in _workflow_files():
        doc = yaml.safe_load(path.read_text())
        jobs += [(f"{path.name}:{n}", job, {**doc.get("env", {}), **job.get("env", {})})
                 for n, job in doc["jobs"].items()]
    return [*jobs, ("action.yml", yaml.safe_load(ACTION_YML.read_text())["runs"], {})]


def _holds_token(job: dict[str, Any]) -> bool:
    text = yaml.safe_dump(job)
    return "secrets." in text or "inputs.hf-token" in text or job.get("permissions", {}).get("id-token") == "write"


def test_in_jobs_holding_a_token_every_install_is_hashed_and_no_install_step_sees_the_token() -> None:
    token_jobs = [(name, job, env) for name, job, env in _jobs() if _holds_token(job)]
    assert [name for name, _, _ in token_jobs] == [
        "merge.yml:auth", "merge.yml:merge", "merge.yml:merge-oidc", "action.yml"
    ]
    install_steps = 0
    for name, job, shared in token_jobs:
        for step in job["steps"]:
            run = step.get("run", "")
            installs = _pip_installs(run + "".join((SCRIPTS / s).read_text() for s in _scripts_run_by(run)))
            if not installs:
                continue
            install_steps += 1
            env = yaml.safe_dump({**shared, **step.get("env", {})})
            assert "HF_TOKEN" not in env and "secrets." not in env and "hf-token" not in env, (name, step)
            for line in installs:
                assert "--require-hashes" in line or line in _UNHASHED, (name, line)
            assert any("--require-hashes" in line and "requirements/hubmerge.txt" in line for line in installs)
    assert install_steps == 3  # merge, merge-oidc and action.yml each install in one step, without a token
    # The steps that push (the token's only users) install nothing, the eval extra included.
    merge = (SCRIPTS / "merge-recipe.sh").read_text() + (SCRIPTS / "lib.sh").read_text()
    assert _pip_installs(merge) == []


def _requirements(name: str) -> dict[str, tuple[str, list[str]]]:
    """package -> (version, hashes) of a compiled requirements file; every entry must be pinned."""
    entries: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=\S)", (REQUIREMENTS / name).read_text()):
        if block.startswith("#") or not block.strip():
            continue
        package, version = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block).groups()  # type: ignore[union-attr]
        entries[package.lower()] = (version, re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return entries


def test_hashed_requirements_pin_the_eval_extra_at_hubmerge_txts_versions_and_never_torch() -> None:
    from packaging.requirements import Requirement

    base, full = _requirements("hubmerge.txt"), _requirements("eval.txt")
    assert all(hashes for _, hashes in [*base.values(), *full.values()])
    assert {p: full[p][0] for p in base} == {p: v for p, (v, _) in base.items()}  # a superset, same versions
    pyproject = (REPO / "pyproject.toml").read_text()
    extra = re.search(r"^eval = (\[.*\])$", pyproject, flags=re.M).group(1)  # type: ignore[union-attr]
    for spec in map(Requirement, json.loads(extra)):
        assert spec.specifier.contains(full[spec.name.lower()][0]), spec
    assert not [p for p in full if p == "torch" or p.startswith(("nvidia-", "triton"))]


def _eval_recipe(tmp_path: Path, tasks: str) -> Path:
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'method = "ties"\nbase = "./base"\nmodels = ["./a"]\n[eval]\ntasks = {tasks}\n')
    return recipe


def test_eval_detection_fails_the_step_where_tomllib_is_missing_instead_of_skipping_the_gate(tmp_path: Path) -> None:
    detect = f'source {SCRIPTS / "lib.sh"}; has_eval=$(recipe_has_eval "$1"); echo "eval=$has_eval"'
    for tasks, expected in (('["arc_easy"]', "true"), ("[]", "false")):
        result = subprocess.run([*BASH, "-c", detect, "-", _eval_recipe(tmp_path, tasks)], capture_output=True,
                                text=True, env=_runner_env())
        assert result.returncode == 0 and result.stdout == f"eval={expected}\n", result.stderr
    old_python = tmp_path / "py310"  # what Python 3.10 has: no tomllib
    old_python.mkdir()
    (old_python / "tomllib.py").write_text("raise ModuleNotFoundError(\"No module named 'tomllib'\")\n")
    recipe = _eval_recipe(tmp_path, '["arc_easy"]')
    result = subprocess.run([*BASH, "-c", detect, "-", recipe], capture_output=True, text=True,
                            env=_runner_env(PYTHONPATH=str(old_python)))
    assert result.returncode != 0 and "eval=" not in result.stdout and "tomllib" in result.stderr
    merge = subprocess.run([*BASH, str(SCRIPTS / "merge-recipe.sh")], capture_output=True, text=True, cwd=tmp_path,
                           env=_runner_env(PYTHONPATH=str(old_python), RECIPE=str(recipe), PUSH="false"))
    assert merge.returncode != 0 and not (tmp_path / "r").exists(), merge.stdout  # no merge without its gate


def test_a_merge_step_without_the_eval_extra_stops_instead_of_installing_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-lm-eval"
    missing.mkdir()
    (missing / "lm_eval.py").write_text("raise ModuleNotFoundError(\"No module named 'lm_eval'\")\n")
    recipe = _eval_recipe(tmp_path, '["arc_easy"]')
    merge = subprocess.run([*BASH, str(SCRIPTS / "merge-recipe.sh")], capture_output=True, text=True, cwd=tmp_path,
                           env=_runner_env(PYTHONPATH=str(missing), RECIPE=str(recipe), PUSH="false"))
    assert merge.returncode == 7, merge.stdout + merge.stderr
    assert f"::error file={recipe},title=hubmerge evaluation error (exit 7)::" in merge.stdout
    assert "pip" not in merge.stdout + merge.stderr


@pytest.mark.parametrize(("tasks", "files"), [('["arc_easy"]', ["hubmerge.txt", "eval.txt"]), ("[]", ["hubmerge.txt"])])
def test_install_step_installs_the_hashed_eval_requirements_when_the_recipe_has_an_eval_table(
    tmp_path: Path, tasks: str, files: list[str]
) -> None:
    shims = tmp_path / "bin"  # pip and hubmerge recorded, not run; every other python call is the real one
    shims.mkdir()
    log = tmp_path / "pip.log"
    (shims / "python").write_text(f'#!/bin/bash\nif [[ $1 == -m && $2 == pip ]]; then echo "$*" >>{log}; exit 0; fi\n'
                                  f'exec {sys.executable} "$@"\n')
    (shims / "hubmerge").write_text("#!/bin/bash\necho hubmerge 0.1.0\n")
    for shim in shims.iterdir():
        shim.chmod(0o755)
    env = _runner_env(RECIPE=str(_eval_recipe(tmp_path, tasks)), HUBMERGE_SPEC=".")
    env["PATH"] = f"{shims}{os.pathsep}{env['PATH']}"
    result = subprocess.run([*BASH, str(SCRIPTS / "install-hubmerge.sh")], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    hashed = [line for line in log.read_text().splitlines() if "--require-hashes" in line]
    assert [Path(line.split(" -r ")[1]).name for line in hashed] == files


def test_the_docs_say_to_copy_every_folder_the_scripts_read_and_the_python_they_need() -> None:
    page = (REPO / "docs" / "github-actions.md").read_text()
    step = page.split("## 1. Copy the workflow")[1].split("\n## ")[0]
    scripts = "".join(p.read_text() for p in SCRIPTS.glob("*.sh"))
    folders = {"scripts", *re.findall(r"\$\(dirname \"\$0\"\)/\.\./(\w+)", scripts)}
    assert folders == {"scripts", "requirements"}
    for folder in folders:
        assert f"`.github/{folder}/`" in step, folder
    # The hashes pin what one hubmerge depends on: they come from the release the workflow installs.
    assert "Copy the three\nfrom that same release or commit" in step and "Python 3.11 or later" in step
    # The scripts read recipes with tomllib: the action says so, and the install refuses an older Python.
    action = ACTION_YML.read_text()
    assert "3.11+" in action and "3.10" not in action
    assert "sys.version_info < (3, 11)" in (SCRIPTS / "install-hubmerge.sh").read_text()


# ---------------------------------------------------------------------------- changed-recipe detection


def _git(repo: Path, *args: str) -> str:
    env = _runner_env(GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="t",
                      GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def _write(repo: Path, files: Mapping[str, str | None]) -> None:
    """Write each file (None deletes it)."""
    for name, text in files.items():
        path = repo / name
        if text is None:
            path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def _commit(repo: Path, message: str) -> str:
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


def _parse_github_output(path: Path) -> dict[str, str]:
    """`name=value` lines and `name<<DELIMITER` blocks, as the runner reads them."""
    outputs, lines = {}, iter(path.read_text().splitlines() if path.exists() else [])
    for line in lines:
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            outputs[name] = "\n".join(iter(lambda: next(lines), delimiter))
        else:
            name, value = line.split("=", 1)
            outputs[name] = value
    return outputs


def _detect(repo: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    output = repo.parent / "detect-output"
    output.unlink(missing_ok=True)
    result = subprocess.run([*BASH, str(DETECT)], cwd=repo, capture_output=True, text=True, timeout=60,
                            env=_runner_env(GITHUB_OUTPUT=str(output), **env))
    return result, _parse_github_output(output)


@pytest.fixture
def recipes_repo(tmp_path: Path) -> Path:
    """A repo whose first commit holds recipes a, c, sub/d, a non-recipe file in recipes/, and a README."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _write(repo, {"recipes/a.toml": "a", "recipes/b.toml": "b", "recipes/c.toml": "c\n" * 20,
                  "recipes/sub/d.toml": "d", "recipes/notes.md": "n", "README.md": "r"})
    _commit(repo, "first")
    return repo


def test_changed_recipes_are_added_modified_and_renamed_ones_not_deleted(recipes_repo: Path) -> None:
    base = _git(recipes_repo, "rev-parse", "HEAD")
    _git(recipes_repo, "mv", "recipes/c.toml", "recipes/c-renamed.toml")
    _write(recipes_repo, {"recipes/a.toml": "a2", "recipes/b.toml": None, "recipes/sub/d.toml": "d2",
                          "recipes/new one.toml": "n", "recipes/notes.md": "n2", "other/x.toml": "x",
                          "README.md": "r2"})
    head = _commit(recipes_repo, "change")
    result, outputs = _detect(recipes_repo, BASE_SHA=base, HEAD_SHA=head)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = ["recipes/a.toml", "recipes/c-renamed.toml", "recipes/new one.toml", "recipes/sub/d.toml"]
    assert json.loads(outputs["recipes"]) == expected
    assert outputs["count"] == "4"
    assert result.stdout.splitlines() == expected


def test_changed_recipes_of_a_pull_request_ignore_later_commits_on_its_base(recipes_repo: Path) -> None:
    _git(recipes_repo, "checkout", "-q", "-b", "pr")
    _write(recipes_repo, {"recipes/b.toml": "b2"})
    pr_head = _commit(recipes_repo, "pr change")
    _git(recipes_repo, "checkout", "-q", "main")
    _write(recipes_repo, {"recipes/a.toml": "a on main"})
    main_head = _commit(recipes_repo, "main moved on")
    _, outputs = _detect(recipes_repo, BASE_SHA=main_head, HEAD_SHA=pr_head)
    assert outputs == {"recipes": '["recipes/b.toml"]', "count": "1"}


@pytest.mark.parametrize("before", [ZERO_SHA, "", "1234567" * 5 + "89abc"], ids=["new-branch", "no-before", "gone"])
def test_without_a_usable_base_every_recipe_in_head_is_taken(recipes_repo: Path, before: str) -> None:
    _write(recipes_repo, {"recipes/e.toml": "e"})
    head = _commit(recipes_repo, "second")
    result, outputs = _detect(recipes_repo, BASE_SHA=before, HEAD_SHA=head)
    assert result.returncode == 0, result.stderr
    assert json.loads(outputs["recipes"]) == ["recipes/a.toml", "recipes/b.toml", "recipes/c.toml",
                                               "recipes/e.toml", "recipes/sub/d.toml"]
    warned = f"::warning::{before} is not in the clone (force push?); taking every recipe in {head}"
    assert (warned in result.stdout) == (before not in ("", ZERO_SHA))


def test_a_change_without_recipes_gives_an_empty_list(recipes_repo: Path) -> None:
    base = _git(recipes_repo, "rev-parse", "HEAD")
    _write(recipes_repo, {"README.md": "r2", "recipes/notes.md": "n2"})
    head = _commit(recipes_repo, "docs")
    result, outputs = _detect(recipes_repo, BASE_SHA=base, HEAD_SHA=head)
    assert (result.returncode, result.stdout) == (0, "")
    assert outputs == {"recipes": "[]", "count": "0"}


@pytest.mark.parametrize(("recipe", "expected"), [
    ("recipes/sub/d.toml", "recipes/sub/d.toml"),
    ("./recipes/a.toml", "recipes/a.toml"),
    ("recipes/missing.toml", None),
    ("recipes/notes.md", None),
    ("recipes/../recipes/a.toml", None),
    ("recipes//a.toml", None),
    ("recipes/sub", None),
    ("recipes/*.toml", None),
])
def test_manual_run_takes_exactly_one_tracked_recipe(recipes_repo: Path, recipe: str, expected: str | None) -> None:
    result, outputs = _detect(recipes_repo, RECIPE=recipe, BASE_SHA="", HEAD_SHA="")
    if expected is None:
        assert result.returncode == 1
        assert result.stdout.startswith("::error::the recipe input must be the path of a tracked")
        assert outputs == {}
    else:
        assert result.returncode == 0, result.stdout + result.stderr
        assert outputs == {"recipes": json.dumps([expected]), "count": "1"}


def test_a_recipe_name_that_could_break_the_json_or_the_log_is_refused(recipes_repo: Path) -> None:
    base = _git(recipes_repo, "rev-parse", "HEAD")
    _write(recipes_repo, {'recipes/x", "y.toml': "x"})
    head = _commit(recipes_repo, "odd name")
    result, outputs = _detect(recipes_repo, BASE_SHA=base, HEAD_SHA=head)
    assert result.returncode == 1
    assert result.stdout == ("::error::a recipe path has characters outside letters, digits, space and "
                             "_./+@-; rename it: recipes/x?? ?y.toml\n")
    assert outputs == {}


# ----------------------------------------------------------------------------- merge.yml, run locally

_EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
_LOOKUP = re.compile(r"[A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)*")


def _evaluate(text: Any, contexts: Mapping[str, Any]) -> str:
    """`${{ a.b.c }}` and `${{ a.b || c.d }}`, with GitHub's rules: a missing value is '', `||` takes the
    first non-empty operand. Anything else fails: the steps run here read plain values only."""

    def lookup(path: str) -> str:
        assert _LOOKUP.fullmatch(path), f"{path!r} is not a plain context lookup"
        node: Any = contexts
        for key in path.split("."):
            node = node.get(key, "") if isinstance(node, Mapping) else ""
        return "" if isinstance(node, Mapping) else str(node)

    def value(match: re.Match[str]) -> str:
        return next((v for v in (lookup(p.strip()) for p in match.group(1).split("||")) if v), "")

    return _EXPRESSION.sub(value, str(text))


class Job:
    """One job of a workflow run as the runner would: see the module docstring for what is skipped."""

    def __init__(self, workflow: Path, job_id: str, workspace: Path, contexts: dict[str, Any],
                 env: dict[str, str]) -> None:
        self.doc = yaml.safe_load(workflow.read_text())
        self.job = self.doc["jobs"][job_id]
        self.workspace, self.env = workspace, env
        self.runner_temp = Path(tempfile.mkdtemp(prefix=f"runner-temp-{job_id}-", dir=workspace.parent))
        self.summary = self.runner_temp / "step-summary.md"
        self.contexts = {"github": {"workspace": str(workspace)}, "env": {}, "steps": {}, **contexts}
        self.logs: dict[str, subprocess.CompletedProcess[str]] = {}
        self.skipped: list[str] = []

    def run(self) -> int:
        """Run the steps until one fails; returns its exit status (0 when all passed)."""
        assert self.doc["defaults"]["run"]["shell"] == "bash"
        for scope in (self.doc.get("env", {}), self.job.get("env", {})):
            self.contexts["env"].update({k: _evaluate(v, self.contexts) for k, v in scope.items()})
        for number, step in enumerate(self.job["steps"]):
            if "uses" in step or step.get("id") == "install":
                self.skipped.append(step.get("uses", "install").split("@")[0])
                continue
            assert "if" not in step and "${{" not in step["run"], step
            name = step.get("name", step["run"])
            script = self.runner_temp / f"step-{number}.sh"
            script.write_text(step["run"])
            output = self.runner_temp / f"output-{number}"
            env = {**self.env, **self.contexts["env"], "GITHUB_OUTPUT": str(output),
                   "GITHUB_STEP_SUMMARY": str(self.summary), "GITHUB_WORKSPACE": str(self.workspace),
                   "RUNNER_TEMP": str(self.runner_temp)}
            env |= {k: _evaluate(v, self.contexts) for k, v in step.get("env", {}).items()}
            self.logs[name] = result = subprocess.run([*BASH, str(script)], cwd=self.workspace, env=env,
                                                      capture_output=True, text=True, timeout=300)
            if "id" in step:
                self.contexts["steps"][step["id"]] = {"outputs": _parse_github_output(output)}
            if result.returncode != 0:
                return result.returncode
        return 0

    @property
    def outputs(self) -> dict[str, str]:
        return {k: _evaluate(v, self.contexts) for k, v in self.job.get("outputs", {}).items()}

    def log(self, name: str) -> str:
        return self.logs[name].stdout + self.logs[name].stderr


@pytest.fixture(scope="module")
def hub() -> Iterator[LocalHub]:
    """The tiny checkpoints as Qwen/... repos, and a user who may push."""
    with local_hub({repo: TINY / name for repo, name in POOL.items()}) as server:
        yield server


def _hub_recipe(example: str, repo: str) -> str:
    """A tiny example recipe with Hub sources instead of its local folders, pushing to `repo`."""
    text = (REPO / "recipes" / "examples" / example).read_text()
    for name, source in SOURCE_OF.items():
        text = text.replace(f'"./tiny/{name}"', f'"{source}"')
    assert "./tiny/" not in text
    return text + f'\n[output]\nrepo = "{repo}"\n'


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A git checkout of a recipes repo: merge.yml's scripts and, on main, one recipe of another merge."""
    ws = tmp_path / "workspace"
    shutil.copytree(REPO / ".github", ws / ".github")
    _git(ws, "init", "-q", "-b", "main")
    _write(ws, {"recipes/old.toml": _hub_recipe("tiny-simple_average.toml", "user/old")})
    _commit(ws, "first")
    return ws


def _step_env(hub: LocalHub, tmp_path: Path) -> dict[str, str]:
    """What the runner's environment contributes: the Hub endpoint, and no token nor HF_HOME of its own."""
    env = hub_env(hub, tmp_path, token=None)
    del env["HF_TOKEN"], env["HF_HOME"]
    return _runner_env(**env, RUNNER_OS="Linux", RUNNER_ENVIRONMENT="self-hosted")


def _find_recipes(ws: Path, env: dict[str, str], event: dict[str, Any]) -> dict[str, str]:
    job = Job(MERGE_YML, "recipes", ws, {"github": {"workspace": str(ws), **event}}, env)
    assert job.run() == 0, job.logs
    assert job.skipped == ["actions/checkout"]
    return job.outputs


@pytest.mark.slow
def test_push_to_main_merges_each_changed_recipe_and_pushes_it(hub: LocalHub, workspace: Path,
                                                                 tmp_path: Path) -> None:
    before = _git(workspace, "rev-parse", "HEAD")
    _write(workspace, {"recipes/tiny-ties.toml": _hub_recipe("tiny-ties.toml", "user/tiny-ties")})
    after = _commit(workspace, "add a recipe")
    env = _step_env(hub, tmp_path)
    found = _find_recipes(workspace, env, {"sha": after, "event": {"before": before}})
    assert found == {"recipes": '["recipes/tiny-ties.toml"]', "count": "1"}

    for recipe in json.loads(found["recipes"]):
        job = Job(MERGE_YML, "merge", workspace, {"matrix": {"recipe": recipe}, "secrets": {"HF_TOKEN": TOKEN},
                                                  "needs": {"recipes": {"outputs": found}}}, env)
        assert job.run() == 0, {name: job.log(name) for name in job.logs}
        assert job.skipped == ["actions/checkout", "actions/setup-python", "install"]

    assert "deleting nothing" in job.log("Free disk space")
    head = hub.head("user/tiny-ties")
    commit_url = f"{hub.url}/user/tiny-ties/commit/{head}"
    assert job.contexts["steps"]["merge"]["outputs"] == {"commit-url": commit_url}
    summary = job.summary.read_text()
    assert summary.startswith("### Merged `tiny-ties.toml` (ties)\n")
    assert f"Pushed: {commit_url}\n" in summary
    for role, source in (("base", "base"), ("models[0]", "math"), ("models[1]", "coder"), ("models[2]", "instruct")):
        repo = SOURCE_OF[source]
        assert f"| {role} | `{repo}` |  | `{hub.head(repo)}` |" in summary

    pushed = hub.files("user/tiny-ties")
    output = workspace / "outputs" / "tiny-ties"
    assert pushed["model.safetensors"] == (output / "model.safetensors").read_bytes()
    assert pushed["README.md"] == (output / "README.md").read_bytes()
    assert not any("user/old" in r.path for r in hub.requests)  # recipes/old.toml did not change
    # The Hugging Face cache went to the workspace, not to /tmp or the home folder.
    assert (workspace / ".cache" / "huggingface" / "hub" / "models--Qwen--Qwen2.5-1.5B").is_dir()

    with process_like(None, hub_env(hub, tmp_path / "user")):  # a user loads what the job pushed
        from huggingface_hub import snapshot_download
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(snapshot_download("user/tiny-ties"))
    assert sum(p.numel() for p in model.parameters()) == 107072


@pytest.mark.slow
def test_merge_job_passes_a_disk_budget_set_as_a_repository_variable(
    hub: LocalHub, workspace: Path, tmp_path: Path
) -> None:
    recipe = "recipes/tiny-ties.toml"
    _write(workspace, {recipe: _hub_recipe("tiny-ties.toml", "user/budgeted")})
    _commit(workspace, "add a recipe")
    contexts = {
        "matrix": {"recipe": recipe},
        "secrets": {"HF_TOKEN": TOKEN},
        "vars": {"HUBMERGE_MAX_DISK": "1KB"},  # unset, the budget is the runner's free disk
    }
    job = Job(MERGE_YML, "merge", workspace, contexts, _step_env(hub, tmp_path))
    assert job.run() == 1
    assert "but the budget is 1000 B (--max-disk or [output] max_disk)" in job.log("Merge and push")
    assert "user/budgeted" not in hub._repos  # refused before anything was downloaded or pushed


@pytest.mark.slow
def test_merge_without_hf_token_uses_trusted_publishing_for_the_output_repo(hub: LocalHub, workspace: Path,
                                                                             tmp_path: Path) -> None:
    recipe = "recipes/tiny-ties.toml"
    _write(workspace, {recipe: _hub_recipe("tiny-ties.toml", "user/oidc-target")})
    start = len(hub.requests)
    job = Job(MERGE_YML, "merge-oidc", workspace, {"matrix": {"recipe": recipe}}, _step_env(hub, tmp_path))
    assert job.run() != 0
    log = job.log("Merge and push")
    assert "No HF_TOKEN: pushing to user/oidc-target with Hugging Face trusted publishing (OIDC)" in log
    # Outside GitHub Actions no OIDC id token can be minted: huggingface_hub refuses before any download.
    assert "HF_OIDC_RESOURCE is set but no OIDC id token is available" in log
    assert f"::error file={recipe},title=hubmerge " in log
    assert hub.bytes_served(lambda p: p.endswith(".safetensors"), include_ranges=False, since=start) == 0
    assert not any("oidc-target" in r.path for r in hub.requests[start:])  # nothing created, nothing pushed


@pytest.mark.slow
def test_pull_request_check_plans_changed_recipes_without_token_or_weight_downloads(
        hub: LocalHub, workspace: Path, tmp_path: Path) -> None:
    base = _git(workspace, "rev-parse", "HEAD")
    typo = _hub_recipe("tiny-ties.toml", "user/typo").replace('method = "ties"', 'method = "tie"')
    _write(workspace, {"recipes/tiny-ties.toml": _hub_recipe("tiny-ties.toml", "user/pr"), "recipes/typo.toml": typo})
    head = _commit(workspace, "pull request")
    env = _step_env(hub, tmp_path)
    found = _find_recipes(workspace, env, {"sha": "merge-commit", "event": {
        "before": "", "pull_request": {"base": {"sha": base}, "head": {"sha": head}}}})
    assert found == {"recipes": '["recipes/tiny-ties.toml", "recipes/typo.toml"]', "count": "2"}

    start = len(hub.requests)
    job = Job(MERGE_YML, "check", workspace, {"needs": {"recipes": {"outputs": found}}}, env)
    assert job.run() == 1  # the typo fails the check, after the other recipe was planned
    assert job.skipped == ["actions/checkout", "actions/setup-python", "install"]
    assert ("::error file=recipes/typo.toml,title=hubmerge recipe error (exit 2)::hubmerge: error: recipes/typo.toml: "
            "method: unknown method 'tie'; did you mean 'ties'?\n") in job.log("Validate and plan")

    summary = job.summary.read_text()
    assert summary.startswith("### Plan for `tiny-ties.toml` (ties)\n")
    for source in ("base", "math", "coder", "instruct"):
        assert f"`{SOURCE_OF[source]}` |  | `{hub.head(SOURCE_OF[source])}` |" in summary
    assert "<details><summary>Full plan of <code>recipes/tiny-ties.toml</code></summary>" in summary
    assert "push     user/pr (main): the output folder" in summary
    assert "typo" not in summary
    assert hub.bytes_served(lambda p: p.endswith(".safetensors"), include_ranges=False, since=start) == 0
    assert not (workspace / "outputs").exists()


@pytest.mark.slow
def test_a_recipe_with_an_eval_table_is_evaluated_and_a_missed_gate_blocks_the_push(hub: LocalHub, workspace: Path,
                                                                                      tmp_path: Path) -> None:
    recipe = "recipes/tiny-ties.toml"
    # lm-eval reads the custom task's data_files relative to the working directory, the workspace.
    shutil.copytree(REPO / "tests" / "data" / "lm_eval", workspace / "tests" / "data" / "lm_eval")
    gate = ('[eval]\ntasks = ["hubmerge_tiny"]\ninclude_path = "../tests/data/lm_eval"\nlimit = 4\n'
            "sources = false\nrequire = { hubmerge_tiny = 1.01 }\n")
    _write(workspace, {recipe: _hub_recipe("tiny-ties.toml", "user/eval-gated") + gate})
    env = _step_env(hub, tmp_path) | {"HF_DATASETS_OFFLINE": "1"}
    job = Job(MERGE_YML, "merge", workspace, {"matrix": {"recipe": recipe}, "secrets": {"HF_TOKEN": TOKEN}}, env)
    assert job.run() == 8, {name: job.log(name) for name in job.logs}
    log = job.log("Merge and push")
    assert f"::error file={recipe},title=hubmerge evaluation gate missed (exit 8)::hubmerge: error: the merge " \
           "misses [eval] require (hubmerge_tiny acc,none = " in log
    assert "sanity check passed" in log  # the runner has no HUBMERGE_NO_SANITY: the check ran
    summary = job.summary.read_text()
    assert "### Evaluation\n\n| Task | Metric | merged |\n" in summary
    assert "- ❌ hubmerge_tiny acc,none = " in summary
    assert "user/eval-gated" not in hub._repos  # nothing was created or pushed


# ------------------------------------------------------------------------------------------- search.yml

SEARCH_YML = WORKFLOWS / "search.yml"


def test_search_yml_is_started_by_hand_and_only_the_pull_request_job_may_write() -> None:
    workflow = yaml.safe_load(SEARCH_YML.read_text())
    inputs = workflow[True]["workflow_dispatch"]["inputs"]  # YAML 1.1 reads the key `on` as True
    assert set(workflow[True]) == {"workflow_dispatch"}
    assert {name: (i["type"], i["required"]) for name, i in inputs.items()} == {
        "recipe": ("string", True), "trials": ("string", False), "publish": ("boolean", False)}
    assert workflow["permissions"] == {}
    jobs = workflow["jobs"]
    assert jobs["search"]["permissions"] == {"contents": "read"}
    assert "secrets." not in SEARCH_YML.read_text()  # no Hugging Face token anywhere: a PR, then merge.yml
    pull_request = jobs["pull-request"]
    assert pull_request["if"] == "inputs.publish" and pull_request["needs"] == "search"
    assert pull_request["permissions"] == {"contents": "write", "pull-requests": "write"}
    # The job that can write installs nothing and runs no hubmerge.
    runs = "".join(step.get("run", "") for step in pull_request["steps"])
    scripts = "".join((SCRIPTS / s).read_text() for s in _scripts_run_by(runs))
    assert _scripts_run_by(runs) == ["search-pull-request.sh"]
    assert _pip_installs(scripts) == [] and "hubmerge " not in scripts.replace("hubmerge search:", "")
    upload = [s for s in jobs["search"]["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    download = [s for s in pull_request["steps"] if s.get("uses", "").startswith("actions/download-artifact@")]
    assert upload[0]["with"]["name"] == download[0]["with"]["name"] == "search-results"
    assert download[0]["with"]["path"] == "${{ needs.search.outputs.results }}"


@pytest.mark.slow
def test_search_job_searches_the_recipe_and_the_pull_request_job_proposes_best_toml(
    hub: LocalHub, workspace: Path, tmp_path: Path
) -> None:
    recipe = "recipes/tiny-search.toml"
    _write(workspace, {recipe: _hub_recipe("tiny-search.toml", "user/searched")})
    _commit(workspace, "add a recipe to search")
    env = _step_env(hub, tmp_path) | {"PYTHONPATH": str(REPO)}  # this tree's hubmerge, whichever is installed
    inputs = {"recipe": recipe, "trials": "2", "publish": True}
    search = Job(SEARCH_YML, "search", workspace, {"inputs": inputs}, env)
    assert search.run() == 0, {name: search.log(name) for name in search.logs}
    assert search.skipped == ["actions/checkout", "actions/setup-python", "install", "actions/upload-artifact"]
    assert search.outputs == {"results": "recipes/tiny-search-search"}
    results = workspace / "recipes" / "tiny-search-search"
    found = json.loads((results / "search_results.json").read_text())
    assert len(found["trials"]) == 2 and found["best"] is not None
    summary = search.summary.read_text()
    assert summary.startswith("### Searched `tiny-search.toml`\n\nFound by `hubmerge search tiny-search.toml`: trial ")
    assert "The results are in the artifact `search-results` (`recipes/tiny-search-search/`)." in summary

    # The pull-request job, in the same checkout (the artifact downloaded where the search wrote it), with a
    # bare repository as GitHub and gh recorded.
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    _git(workspace, "remote", "add", "origin", str(origin))
    _git(workspace, "push", "-q", "origin", "main")
    shims, calls = tmp_path / "shims", tmp_path / "gh.log"
    shims.mkdir()
    (shims / "gh").write_text(f'#!/bin/bash\nprintf "%s\\n" "$*" >>{calls}\n')
    (shims / "gh").chmod(0o755)
    github = {"workspace": str(workspace), "ref_name": "main", "run_id": "42", "token": "ghs_job_token"}
    contexts = {"inputs": inputs, "github": github, "needs": {"search": {"outputs": search.outputs}}}
    job = Job(SEARCH_YML, "pull-request", workspace, contexts, env | {"PATH": f"{shims}{os.pathsep}{env['PATH']}"})
    assert job.run() == 0, {name: job.log(name) for name in job.logs}
    assert job.skipped == ["actions/checkout", "actions/download-artifact"]
    branch = "hubmerge-search/tiny-search-42"
    added = subprocess.run(["git", "-C", str(origin), "diff", "--name-only", "main", branch],
                           capture_output=True, text=True, check=True).stdout.split()
    assert added == [f"recipes/tiny-search-search/{name}" for name in (  # not the study
        "best.toml", "search_importance.png", "search_objective.png", "search_params.png", "search_results.csv",
        "search_results.json")]
    best = subprocess.run(["git", "-C", str(origin), "show", f"{branch}:recipes/tiny-search-search/best.toml"],
                          capture_output=True, text=True, check=True).stdout
    assert best == (results / "best.toml").read_text()
    gh = calls.read_text()
    assert gh.startswith("auth setup-git\npr create --base main --head hubmerge-search/tiny-search-42 --title "
                         "hubmerge search: tiny-search --body Found by `hubmerge search tiny-search.toml`: trial ")
    assert "merge.yml then merges it and pushes it." in gh
    assert "user/searched" not in hub._repos  # nothing pushed to the Hub: that waits for the review
