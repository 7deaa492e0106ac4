"""The "Errors and exit codes" page (docs/errors.md) against the code, so neither can drift from the other.

The README is the front page of the documentation: tests/test_docs.py checks it and runs the examples of
every page. The codes come from `hubmerge/errors.py` (each class's `exit_code`) and `hubmerge/cli.py` (the codes it
returns itself, and its `--help` epilog); the table must list exactly those, name the right error class
for each, and its example messages must be what the CLI prints today for the same inputs.
"""

from __future__ import annotations

import ast
import re
import shutil
import signal
from pathlib import Path

import pytest
from support.checkpoints import REPO, random_state_dict, write_checkpoint

from hubmerge import cli

ERRORS_PAGE = REPO / "docs" / "errors.md"


def errors_table() -> dict[int, tuple[str, str]]:
    """code -> (meaning, example) from the errors page's table."""
    section = ERRORS_PAGE.read_text()
    rows = {}
    for line in section.splitlines():
        match = re.match(r"^\| (\d+) \| (.*?) \| (.*) \|$", line)
        if match:
            example = match.group(3).strip()
            example = example[2:-2].strip() if example.startswith("``") else example.strip("`")
            rows[int(match.group(1))] = (match.group(2), example)
    return rows


def error_classes() -> dict[int, str]:
    """exit_code -> class name, read from errors.py's source."""
    tree = ast.parse((REPO / "hubmerge" / "errors.py").read_text())
    codes = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if (
                    isinstance(stmt, ast.Assign)
                    and isinstance(stmt.targets[0], ast.Name)
                    and stmt.targets[0].id == "exit_code"
                    and isinstance(stmt.value, ast.Constant)
                ):
                    codes[stmt.value.value] = node.name
    return codes


def cli_codes() -> set[int]:
    """The integer literals cli.py returns or exits with."""
    tree = ast.parse((REPO / "hubmerge" / "cli.py").read_text())
    found = set()
    for node in ast.walk(tree):
        value = None
        if isinstance(node, ast.Return):
            value = node.value
        elif (
            isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "exit"
        ):
            value = node.args[0] if node.args else None
        if (
            isinstance(value, ast.Constant)
            and isinstance(value.value, int)
            and not isinstance(value.value, bool)
        ):
            found.add(value.value)
    return found


def signal_codes() -> set[int]:
    """128 + N for each signal the CLI handles itself (its handler exits with `128 + signum`)."""
    source = (REPO / "hubmerge" / "cli.py").read_text()
    assert "os._exit(128 + signum)" in source
    handled = re.search(r"for s in \(([^)]*)\)\}", source)
    assert handled is not None
    return {
        128 + int(getattr(signal, name.strip().removeprefix("signal.")))
        for name in handled.group(1).split(",")
        if name.strip()
    }


def test_the_errors_page_lists_exactly_the_exit_codes_the_code_defines():
    table = errors_table()
    assert sorted(table) == sorted(set(error_classes()) | cli_codes() | signal_codes())
    assert {0, 1, 2, 3, 4, 5, 6, 7, 8, 70, 130, 143} <= set(table)


def test_each_error_code_row_names_its_error_class_and_shows_a_one_line_error():
    table = errors_table()
    for code, name in error_classes().items():
        meaning, example = table[code]
        assert f"`{name}`" in meaning, (code, meaning)
        assert example.startswith("hubmerge: error: "), example


def test_the_help_epilog_lists_the_same_exit_codes():
    epilog = cli._EPILOG.split("exit codes:", 1)[1].split("Set HUBMERGE_DEBUG", 1)[0]
    assert sorted(int(n) for n in re.findall(r"\b(\d+) [a-z]", epilog)) == sorted(errors_table())


@pytest.fixture
def demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder the errors page's examples were made in (/tmp/demo there)."""
    write_checkpoint(tmp_path / "models" / "base", random_state_dict(0))
    write_checkpoint(tmp_path / "models" / "math", random_state_dict(1))
    write_checkpoint(tmp_path / "models" / "small", random_state_dict(2, vocab=256))
    write_checkpoint(tmp_path / "models" / "nolicense", random_state_dict(3), license=None)
    (tmp_path / "notours").mkdir()
    (tmp_path / "notours" / "x").touch()
    recipes = {
        "ok.toml": 'method = "task_arithmetic"\nbase = "./models/base"\nmodels = ["./models/math"]\n',
        "r2.toml": 'method = "dare-ties"\nbase = "./models/base"\nmodels = ["./models/math"]\n',
        "r3.toml": 'method = "ties"\nbase = "./models/base"\nmodels = ["./models/maths"]\n',
        "r4.toml": 'method = "ties"\nbase = "./models/base"\nmodels = ["./models/small"]\n',
        "r5.toml": 'method = "ties"\nbase = "./models/base"\nmodels = ["./models/nolicense"]\n',
    }
    for name, text in recipes.items():
        (tmp_path / name).write_text(text + '[output]\ndir = "out"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    monkeypatch.delenv("HUBMERGE_DEBUG", raising=False)
    return tmp_path


@pytest.mark.parametrize(
    ("code", "argv"),
    [
        (0, ["ok.toml", "--no-push"]),
        (1, ["ok.toml", "--no-push", "--output", "notours"]),
        (2, ["r2.toml"]),
        (3, ["r3.toml"]),
        (4, ["r4.toml"]),
        (5, ["card", "r5.toml"]),
    ],
)
def test_the_errors_page_examples_are_what_the_cli_prints(demo, capsys, code, argv):
    example = errors_table()[code][1].replace("/tmp/demo", str(demo))
    assert cli.main(argv) == code
    captured = capsys.readouterr()
    printed = (captured.out if code == 0 else captured.err).strip().splitlines()[-1]
    if example.endswith(" (...)"):  # shortened in the table
        assert printed.startswith(example.removesuffix(" (...)")), printed
    else:
        assert printed == example
    shutil.rmtree(demo / "out", ignore_errors=True)


# --- the recipe guide ------------------------------------------------------------------------------------


def test_the_recipe_guide_parameter_example_resolves_as_its_text_says(tmp_path: Path) -> None:
    """The recipe guide's gradient and filter example resolves as its text says."""
    from hubmerge.api import load_plan
    from hubmerge.recipe.load import load_recipe

    text = (REPO / "docs" / "recipe.md").read_text()
    section = text.split("## Parameter values", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    for name, seed in (("base", 0), ("math", 1)):
        write_checkpoint(tmp_path / name, random_state_dict(seed))
    body = section.replace('"Qwen/Qwen2.5-Math-1.5B"', '"./math"')
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('base = "./base"\n' + body)
    assert load_recipe(recipe).method.name == "task_arithmetic"
    tensors = {t.name: t for t in load_plan(recipe).tensors}
    resolved = {
        name: (tensors[name].params["scaling_factor"], tensors[name].model_params[0]["weight"])
        for name in (
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.self_attn.q_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
        )
    }
    # The model's own rules win over [parameters]' mlp rule; gradients give layer 0 the first value, the
    # last layer the last one, and the embedding the first one.
    assert resolved == {
        "model.embed_tokens.weight": (0.3, 1.0),
        "model.layers.0.self_attn.q_proj.weight": (0.3, 0.2),
        "model.layers.1.self_attn.q_proj.weight": (0.5, 1.0),
        "model.layers.1.mlp.up_proj.weight": (0.5, 1.0),
    }
