"""The documentation site (`docs/`, `mkdocs.yml`) and README.md, its front page, against the code.

The pages made from code are up to date (`python -m hubmerge.docs_gen --check`), the site builds with
`mkdocs build --strict` (every link and anchor resolves), README's links resolve, and every example in the
pages runs: each TOML block validates as a recipe (a fragment inside a minimal one), each Python block
runs, each YAML block parses, and each shell command runs offline in a copy of `recipes/` unless
`NOT_RUN` says why it cannot.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.checkpoints import REPO

from hubmerge import cli, docs_gen
from hubmerge.merging.methods import METHODS

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

DOCS = REPO / "docs"
PAGES = sorted([REPO / "README.md", *DOCS.rglob("*.md")])
FENCE = re.compile(r"^( *)```(\w*)[^\n]*\n(.*?)^\1```$", re.MULTILINE | re.DOTALL)

# Shell commands in the pages that the tests do not run, and why. Every other command must be a `hubmerge`
# command that runs offline; an entry no page holds any more fails `test_not_run_lists_only_commands_in_the_pages`.
NOT_RUN = {
    "pip install -e .": "installs packages (needs a package index)",
    'pip install -e ".[test]"': "installs packages (needs a package index)",
    'pip install -e ".[docs]"': "installs packages (needs a package index)",
    "pytest": "the whole test suite, of which this is a part",
    'pytest -m "not slow"': "the fast part of the test suite, of which this is a part",
    "pytest -n0 tests/test_x.py": "a placeholder file name, in the test suite of which this is a part",
    "ruff check .": "the linter: CI runs it",
    "mypy": "the type checker: CI runs it",
    "bash .ci/run": "CI itself",
    "mkdocs build --strict": "test_the_site_builds_strictly runs it",
    "mkdocs serve": "a server that runs until stopped",
    "python -m hubmerge.docs_gen": "rewrites the repository's pages; test_the_generated_pages_are_up_to_date "
    "runs it with --check",
    "hubmerge plan recipes/qwen2.5-1.5b/three_models/ties.toml": "reads Qwen2.5-1.5B from the Hub",
    "hubmerge recipes/qwen2.5-1.5b/three_models/ties.toml": "downloads Qwen2.5-1.5B models from the Hub",
    "hubmerge search recipes/examples/tiny-search.toml --output outputs/search": "eight merges, tens of "
    "seconds: tests/test_search.py runs searches of the tiny models",
    "hubmerge outputs/search/best.toml": "needs the search above",
    "hubmerge search recipes/examples/skills-search.toml --output outputs/skills-search": "eight merges and "
    "lm-eval runs, ~2 min: tests/test_search_demo.py runs it",
    "hubmerge ui": "a server that runs until stopped (tests/test_ui_api.py starts one)",
    "hubmerge ui --host 0.0.0.0 --port 8080 --work-dir /srv/merges": "a server that runs until stopped",
    "hf upload your-name/hubmerge space/ --repo-type space": "uploads to the Hub",
    "llama-cli -hf your-name/Qwen2.5-1.5B-TIES-GGUF:Q4_K_M": "llama.cpp and a Hub repo",
    "ollama run hf.co/your-name/Qwen2.5-1.5B-TIES-GGUF:Q4_K_M": "Ollama and a Hub repo",
    "ray start --head --num-cpus 4": "starts a Ray cluster",
    "ray start --address HEAD_IP:6379 --num-cpus 4": "joins a Ray cluster",
    "hubmerge search recipe.toml --ray HEAD_IP:6379 --output outputs/search": "needs a Ray cluster",
}
# Python blocks that need what a test cannot have, by a line they hold.
PYTHON_NOT_RUN = {
    'app = Client("http://127.0.0.1:7860/")': "needs a running `hubmerge ui` (tests/test_ui_api.py drives one)",
}
# Files a TOML example names, made beside it so that it validates (the recipe with every table).
NAMED_FILES = {"my_card.md.j2": "---\n{{ front_matter }}\n---\n", "my_texts.txt": "Some text.\n"}
NAMED_FOLDERS = ("tasks",)


def blocks(language: str) -> list[tuple[str, str]]:
    """(page:line, text) of every fenced block of `language` in the pages."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(2) == language:
                body = "\n".join(line[len(match.group(1)) :] for line in match.group(3).splitlines())
                line = text.count("\n", 0, match.start()) + 1
                found.append((f"{page.relative_to(REPO)}:{line}", body))
    return found


def commands() -> list[tuple[str, str]]:
    """(page:line, command) of every command in the shell blocks: comments and console output left out,
    `a && b` as two commands."""
    found = []
    for where, body in blocks("bash") + blocks("sh") + blocks("console"):
        console = "$ " in body
        for line in body.splitlines():
            if console:
                if not line.startswith("$ "):
                    continue  # output
                line = line[2:]
            line = re.sub(r"\s+#.*$", "", line).strip()
            found += [(where, part.strip()) for part in line.split("&&") if part.strip()]
    return found


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding a copy of the repository's recipes (and its tiny models), as the current directory."""
    shutil.copytree(REPO / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    return tmp_path


# --- generated pages ----------------------------------------------------------------------------------------


def test_the_generated_pages_are_up_to_date(capsys: pytest.CaptureFixture[str]) -> None:
    assert docs_gen.main(["--check"]) == 0, capsys.readouterr().out


@pytest.mark.slow
def test_docs_gen_check_reports_a_stale_page_and_a_removed_method_and_rewrites_the_stale_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(DOCS, tmp_path / "docs")
    for name in ("README.md", "mkdocs.yml"):
        shutil.copy(REPO / name, tmp_path / name)
    page = tmp_path / "docs" / "methods" / "ties.md"
    current = page.read_text()
    page.write_text(current.replace("`scaling_factor` | number | `0.3`", "`scaling_factor` | number | `0.5`"))
    assert page.read_text() != current
    assert docs_gen.main(["--check"], root=tmp_path) == 1
    assert "docs/methods/ties.md: out of date" in capsys.readouterr().out
    assert docs_gen.main([], root=tmp_path) == 0
    assert page.read_text() == current
    assert docs_gen.main(["--check"], root=tmp_path) == 0
    (tmp_path / "docs" / "methods" / "old_method.md").write_text("# gone\n")
    assert docs_gen.main(["--check"], root=tmp_path) == 1
    assert "docs/methods/old_method.md: names no method; delete it" in capsys.readouterr().out


def test_every_method_has_a_page_in_the_site_menu_and_a_row_in_the_table() -> None:
    site = (REPO / "mkdocs.yml").read_text()
    table = (DOCS / "methods" / "index.md").read_text()
    rows = re.findall(r"^\| \[`(\w+)`\]\((\w+)\.md\) \|", table, flags=re.MULTILINE)
    assert rows == [(name, name) for name in METHODS]
    for name in METHODS:
        assert (DOCS / "methods" / f"{name}.md").is_file()
        assert f"      - {name}: methods/{name}.md\n" in site


def test_a_method_page_holds_its_formula_parameters_defaults_and_citation() -> None:
    ties = (DOCS / "methods" / "ties.md").read_text()
    method = METHODS["ties"]
    assert method.formula in ties and method.notes in ties
    assert "| `threshold` | number | `20.0` | 0 to 100 | no: one value for the model |" in ties
    assert "[Yadav et al. 2023](https://arxiv.org/abs/2306.01708)" in ties and "eprint={2306.01708}" in ties
    # FusionBench's configuration is the example's values
    assert "scaling_factor = 0.8\nthreshold = 20.0" in ties


def test_the_recipe_reference_lists_every_key_of_every_table_with_its_default() -> None:
    from hubmerge.recipe.schema import json_schema

    reference = (DOCS / "reference" / "recipe.md").read_text()
    defs = json_schema()["$defs"]
    for table in ("OutputTable", "CardTable", "EvalTable", "SearchTable", "TokenizerTable", "SourceTable"):
        for key in defs[table]["properties"]:
            assert f"| `{key}` |" in reference, (table, key)
    assert (
        '| `max_shard_size` | size: bytes, or a string such as "5GB", "500MB", "2GiB" | `"5GB"` |'
        in reference
    )
    assert '| `sampler` | `"tpe"` or `"cmaes"` or `"random"` or `"grid"` | `"tpe"` |' in reference


# --- the site and the front page ----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """Every page in the menu, every link and anchor resolves (mkdocs.yml's `validation`), the API page's
    docstrings load."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # no "MkDocs 2.0" banner on stderr
    )
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "upload_while_merging" in api  # mkdocstrings rendered merge()'s signature
    assert (tmp_path / "site" / "methods" / "sce" / "index.html").is_file()


def test_the_commands_page_lists_every_command_of_the_help() -> None:
    page = (DOCS / "commands.md").read_text()
    listed = re.findall(r"^  hubmerge (\w[\w-]*)", cli._EPILOG, flags=re.MULTILINE)
    assert {"validate", "plan", "search", "ui", "gguf", "import-mergekit"} <= set(listed)
    for command in listed:
        if command != "RECIPE":
            assert f"`hubmerge {command} " in page or f"`hubmerge {command}`" in page, command


def test_the_readme_is_a_front_page_with_the_two_commands_and_every_method() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) < 8 * 1024
    assert "```bash\npip install -e . && hubmerge recipes/examples/tiny-ties.toml\n```" in readme
    assert '```bash\npip install -e ".[test]" && pytest\n```' in readme
    for name in METHODS:
        assert f"[`{name}`](docs/methods/{name}.md)" in readme


def _anchors(page: Path) -> set[str]:
    """The ids mkdocs's toc extension gives the page's headings."""
    from markdown.extensions.toc import slugify

    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
    return {slugify(h, "-") for h in headings}


def test_every_link_in_the_readme_resolves() -> None:
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [link for link in links if not re.match(r"https?://", link)]
    assert len(local) > 20
    for link in local:
        path, _, anchor = link.partition("#")
        target = REPO / path
        assert target.exists(), link
        if anchor:
            assert anchor in _anchors(target), link


# --- the examples -------------------------------------------------------------------------------------------


def _recipe_text(body: str) -> str:
    """A TOML example as a whole recipe: a fragment gets the method, base and models it lacks."""
    data = tomllib.loads(body)
    missing = {
        "method": 'method = "task_arithmetic"',
        "base": 'base = "Qwen/Qwen2.5-1.5B"',
        "models": 'models = ["Qwen/Qwen2.5-Math-1.5B"]',
    }
    return "".join(line + "\n" for key, line in missing.items() if key not in data) + body


@pytest.mark.parametrize(("where", "body"), blocks("toml"), ids=[w for w, _ in blocks("toml")])
def test_every_toml_example_is_a_valid_recipe(workdir: Path, where: str, body: str) -> None:
    from hubmerge.recipe.load import load_recipe

    folder = workdir / "recipes" / "examples"  # where "./tiny/..." models are
    for name, text in NAMED_FILES.items():
        (folder / name).write_text(text)
    for name in NAMED_FOLDERS:
        (folder / name).mkdir(exist_ok=True)
    recipe = folder / "example.toml"
    recipe.write_text(_recipe_text(body))
    loaded = load_recipe(recipe)
    if "method =" in body:
        assert loaded.method.name == tomllib.loads(body)["method"]


def test_the_toml_examples_cover_every_method_page_and_the_readme() -> None:
    where = {w.split(":")[0] for w, _ in blocks("toml")}
    assert {f"docs/methods/{name}.md" for name in METHODS} <= where
    assert {"README.md", "docs/recipe.md", "docs/search.md", "docs/getting-started.md"} <= where
    languages = {m.group(2) for page in PAGES for m in FENCE.finditer(page.read_text())}
    # every language a test runs or checks; bibtex is the generated citation, text the terminal's output
    assert languages == {"toml", "python", "bash", "sh", "console", "yaml", "jinja", "bibtex"}, languages


@pytest.mark.parametrize(("where", "body"), blocks("python"), ids=[w for w, _ in blocks("python")])
def test_every_python_example_runs(workdir: Path, where: str, body: str) -> None:
    code = compile(body, where, "exec")
    reasons = [reason for line, reason in PYTHON_NOT_RUN.items() if line in body]
    if reasons:
        return  # compiled only, for the reason PYTHON_NOT_RUN gives
    scope: dict[str, object] = {"__name__": "__docs__"}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(code, scope)
    if where.startswith("docs/getting-started.md"):  # what its comments say: a folder written, no push
        result = scope["result"]
        assert result.output_dir == workdir / "outputs" / "tiny-ties"  # type: ignore[attr-defined]
        assert result.commit_url is None  # type: ignore[attr-defined]
        assert str(workdir / "outputs" / "tiny-ties") in out.getvalue()
        assert (workdir / "outputs" / "tiny-ties-inspect" / "merge_stats.json").is_file()


def test_python_not_run_lists_only_blocks_in_the_pages() -> None:
    bodies = [body for _, body in blocks("python")]
    for line in PYTHON_NOT_RUN:
        assert sum(line in body for body in bodies) == 1, line


@pytest.mark.parametrize(("where", "body"), blocks("jinja"), ids=[w for w, _ in blocks("jinja")])
def test_every_card_template_example_renders_the_demo_card(
    workdir: Path, capsys: pytest.CaptureFixture[str], where: str, body: str
) -> None:
    folder = workdir / "recipes" / "examples"
    (folder / "my_card.md.j2").write_text(body + "\n")
    recipe = folder / "card.toml"
    recipe.write_text((folder / "tiny-ties.toml").read_text() + '\n[card]\ntemplate = "my_card.md.j2"\n')
    assert cli.main(["card", str(recipe)]) == 0, capsys.readouterr().err
    card = capsys.readouterr().out
    assert card.startswith("---\nlanguage:") and "\n# card\n" in card
    assert "| base | `tiny/base` | apache-2.0 |" in card and "{{" not in card


def test_the_card_page_lists_exactly_the_variables_a_template_can_use(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = workdir / "recipes" / "examples"
    (folder / "my_card.md.j2").write_text("---\n{{ front_matter }}\n---\n{{ no_such_variable }}\n")
    recipe = folder / "card.toml"
    recipe.write_text((folder / "tiny-ties.toml").read_text() + '\n[card]\ntemplate = "my_card.md.j2"\n')
    assert cli.main(["card", str(recipe)]) == 5
    usable = capsys.readouterr().err.strip().split("the template can use: ", 1)[1].split(", ")
    documented = [name for name, _, _ in docs_gen.card_context()]
    assert sorted(documented) == sorted(usable) and len(usable) > 15
    assert all(what for _, _, what in docs_gen.card_context())


@pytest.mark.parametrize(("where", "body"), blocks("yaml"), ids=[w for w, _ in blocks("yaml")])
def test_every_yaml_example_parses_and_uses_only_the_actions_inputs(where: str, body: str) -> None:
    steps = yaml.safe_load(body)["steps"]
    inputs = yaml.safe_load((REPO / "action.yml").read_text())["inputs"]
    ours = [s for s in steps if "hubmerge@" in s.get("uses", "")]
    assert ours and set(ours[0]["with"]) <= set(inputs), where


def test_not_run_lists_only_commands_in_the_pages() -> None:
    found = {command for _, command in commands()}
    assert set(NOT_RUN) <= found, set(NOT_RUN) - found
    assert all(reason for reason in NOT_RUN.values())


def _run(command: str, workdir: Path, capsys: pytest.CaptureFixture[str]) -> int:
    """A `hubmerge` command line, in process; `> FILE` writes its standard output there."""
    argv = shlex.split(command)
    target = None
    if ">" in argv:
        at = argv.index(">")
        argv, target = argv[:at], argv[at + 1]
    assert argv[0] == "hubmerge", f"{command!r}: not a hubmerge command; run it or list it in NOT_RUN"
    code = cli.main(argv[1:])
    out = capsys.readouterr()
    if target:
        path = workdir / target
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(out.out)
    assert code == 0, f"{command}: {out.err}"
    return code


RUN = list({command: (where, command) for where, command in commands() if command not in NOT_RUN}.values())


@pytest.mark.parametrize(("where", "command"), RUN, ids=[c for _, c in RUN])
def test_every_shell_command_runs_offline(
    workdir: Path, capsys: pytest.CaptureFixture[str], where: str, command: str
) -> None:
    _run(command, workdir, capsys)
    if command == "hubmerge recipes/examples/tiny-ties.toml":
        assert (workdir / "outputs" / "tiny-ties" / "model.safetensors").is_file()
    if command == "hubmerge ui --space-files space/":
        assert sorted(p.name for p in (workdir / "space").iterdir()) == [
            "README.md",
            "app.py",
            "requirements.txt",
        ]
    if command.startswith("hubmerge schema > "):
        written = (workdir / command.split("> ")[1]).read_text()
        assert written == (REPO / "hubmerge" / "data" / "recipe.schema.json").read_text()
