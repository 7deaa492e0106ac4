"""What a new user meets on a first run: the output folder's permissions, warnings on settings that are
valid but rarely meant, and the messages of validate, --eval, card and --lock."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.checkpoints import REPO, random_state_dict, write_checkpoint
from support.cli import run_cli
from support.evaluation import eval_recipe

from hubmerge import api
from hubmerge.errors import HubmergeError, RecipeError
from hubmerge.recipe.load import load_recipe


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        write_checkpoint(tmp_path / name, random_state_dict(seed))
    return tmp_path


@pytest.fixture
def umask_027() -> Iterator[None]:
    previous = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(previous)


def test_output_folder_and_files_follow_the_umask_not_mkdtemps_0700(pool: Path, umask_027: None) -> None:
    recipe = pool / "r.toml"
    recipe.write_text('method = "task_arithmetic"\nbase = "./base"\nmodels = ["./a"]\n')
    out = api.merge(
        recipe, output_dir=pool / "out", push=False, quiet=True, stats=False, sanity=False
    ).output_dir
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # what `mkdir` gives under umask 027 (mkdtemp: 0o700)
    files = [p for p in out.iterdir() if p.is_file()]
    assert len(files) >= 5 and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o640}


@pytest.mark.parametrize(
    ("method", "settings", "expected"),
    [
        (
            "task_arithmetic",
            "[parameters]\ndensity = 0\n",
            "density = 0 keeps none of the task vector (the merge is the base model, unchanged)",
        ),
        (
            "task_arithmetic",
            'models = ["./a", { source = "./b", density = 0 }]\n',
            "models[1].density = 0 keeps none of the task vector (models[1] adds nothing to the merge)",
        ),
    ],
)
def test_density_zero_warns_as_threshold_one_does(
    pool: Path, method: str, settings: str, expected: str, run_validate: Callable[[Path], tuple[int, str]]
) -> None:
    models = "" if settings.startswith("models") else 'models = ["./a", "./b"]\n'
    recipe = pool / "r.toml"
    recipe.write_text(f'method = "{method}"\nbase = "./base"\n{models}{settings}')
    warnings = load_recipe(recipe).warnings
    assert [w for w in warnings if "density" in w] == [
        f"{recipe}: {expected}; density is the fraction kept, 1 keeps all of it"
    ]
    code, err = run_validate(recipe)
    assert code == 0 and f"warning: {recipe}: {expected}" in err


def test_density_above_zero_gives_no_density_warning(pool: Path) -> None:
    recipe = pool / "r.toml"
    recipe.write_text(
        'method = "task_arithmetic"\nbase = "./base"\nmodels = ["./a"]\n[parameters]\ndensity = 0.01\n'
    )
    assert not [w for w in load_recipe(recipe).warnings if "density" in w]


@pytest.fixture
def run_validate(capsys: pytest.CaptureFixture[str]) -> Callable[[Path], tuple[int, str]]:
    from hubmerge.cli import main

    def run(recipe: Path) -> tuple[int, str]:
        code = main(["validate", str(recipe)])
        return code, capsys.readouterr().err

    return run


# --- validate ------------------------------------------------------------------------------------------------


def _validate(recipe: Path, text: str) -> tuple[int, str, str]:
    from hubmerge.cli import main

    recipe.write_text(text)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["validate", str(recipe)])
    return code, out.getvalue(), err.getvalue()


def test_validate_counts_one_model_in_the_singular(pool: Path) -> None:
    code, out, _ = _validate(
        pool / "r.toml", 'method = "task_arithmetic"\nbase = "./base"\nmodels = ["./a"]\n'
    )
    assert code == 0 and out == f"ok  {pool / 'r.toml'}  (task_arithmetic, 1 model)\n"
    code, out, _ = _validate(
        pool / "r.toml", 'method = "task_arithmetic"\nbase = "./base"\nmodels = ["./a", "./b"]\n'
    )
    assert out.endswith("(task_arithmetic, 2 models)\n")


@pytest.mark.parametrize(
    ("setting", "key", "tensor"),
    [
        (
            '[parameters]\nt = [{filter = "self_attn", value = 0.3}]\n',
            "parameters.t",
            "model.embed_tokens.weight",
        ),
        (
            '[parameters]\nt = [{filter = "embed", value = 0.3}, {filter = "layers", value = 0.5}]\n',
            "parameters.t",
            "model.norm.weight",
        ),
    ],
)
def test_validate_refuses_a_filter_list_that_leaves_a_tensor_without_value_as_plan_would(
    pool: Path, setting: str, key: str, tensor: str
) -> None:
    text = f'method = "slerp"\nbase = "./base"\nmodels = ["./a"]\n{setting}'
    code, _, err = _validate(pool / "r.toml", text)
    expected = f"{key}: no value for tensor {tensor} (no filter matches it); add a rule without a filter"
    assert code == 2 and err == f"hubmerge: error: {pool / 'r.toml'}: {expected}\n"
    with pytest.raises(
        RecipeError, match=re.escape(expected)
    ):  # what plan says, now before any header is read
        api.load_plan(pool / "r.toml")


def test_validate_refuses_a_per_model_filter_list_without_a_default(pool: Path) -> None:
    text = (
        'method = "passthrough"\nmodels = [{ source = "./a", scale = [{ filter = "mlp", value = 0.5 }] }]\n'
    )
    assert _validate(pool / "r.toml", text)[0] == 0  # scale has a default: tensors no rule matches get it
    text = 'method = "slerp"\nbase = "./base"\nmodels = ["./a"]\n[parameters]\nt = [{filter = "mlp", value = 0.3}, {value = 0.5}]\n'
    assert _validate(pool / "r.toml", text)[0] == 0  # a rule without a filter covers every tensor


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'method = "TIES"\nbase = "./base"\nmodels = ["./a"]\n',
            "method: unknown method 'TIES'; did you mean 'ties'?",
        ),
        (
            'method = "ties"\nbase = "./base"\nmodels = ["./a"]\n[parameters]\ndensity = 0.5\n',
            "parameters.density: unknown key; hubmerge's ties is FusionBench's (scaling_factor, threshold), without "
            'density: for mergekit\'s TIES, with density and a weight per model, write method = "mergekit_ties"',
        ),
        (
            'method = "ties"\nbase = "./base"\nmodels = [{ source = "./a", weight = 0.5 }]\n',
            "models[0].weight: unknown key; hubmerge's ties is FusionBench's (scaling_factor, threshold), without "
            'weight: for mergekit\'s TIES, with density and a weight per model, write method = "mergekit_ties"',
        ),
        (
            'method = "task_arithmetic"\nbase = "./base"\nmodels = ["./a"]\n[parameters]\nlambda = 0.5\n',
            "parameters.lambda: unknown key; did you mean 'scaling_factor'? (mergekit calls it lambda)",
        ),
    ],
)
def test_mergekit_habits_get_a_pointer_to_hubmerges_names(pool: Path, text: str, message: str) -> None:
    code, _, err = _validate(pool / "r.toml", text)
    assert code == 2 and err == f"hubmerge: error: {pool / 'r.toml'}: {message}\n"


# --- the output, its card and its lock -----------------------------------------------------------------------


def _merge(recipe: Path, out: Path, **options: object) -> api.MergeResult:
    settings: dict[str, object] = {"push": False, "quiet": True, "stats": False, "sanity": False, **options}
    return api.merge(recipe, output_dir=out, **settings)  # type: ignore[arg-type]


@pytest.mark.slow
def test_lock_reproduces_the_model_whatever_reports_either_run_wrote(
    pool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = pool / "r.toml"
    recipe.write_text('method = "task_arithmetic"\nbase = "./base"\nmodels = ["./a", "./b"]\n')
    monkeypatch.delenv("HUBMERGE_NO_SANITY")  # this run writes the sanity report (conftest turns it off)
    first = _merge(recipe, pool / "first", stats=True, sanity=True)
    lock = first.output_dir / "hubmerge.lock.json"
    recorded = json.loads(lock.read_text())["output"]["files"]
    assert {"merge_stats.json", "eval_results.json"} <= set(recorded)
    # --no-stats and --no-sanity: the same weights without the reports; that is a reproduction.
    again = _merge(recipe, pool / "again", lock=lock)
    assert (again.output_dir / "model.safetensors").read_bytes() == (
        first.output_dir / "model.safetensors"
    ).read_bytes()
    assert not (again.output_dir / "merge_stats.json").exists()
    # A model file the lock records and this run did not produce is named as such, not as differing.
    edited = json.loads(lock.read_text())
    edited["output"]["files"]["added_tokens.json"] = {"size": 2, "sha256": "0" * 64}
    (pool / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(HubmergeError) as failure:
        _merge(recipe, pool / "third", lock=pool / "edited.json")
    message = str(failure.value)
    assert "did not reproduce" in message and "added_tokens.json not produced by this run" in message
    assert "differ" not in message.split("(")[0]


def test_output_recipe_copy_drops_a_local_schema_line_and_card_and_lock_hash_what_is_pushed(
    pool: Path,
) -> None:
    recipe = pool / "r.toml"
    body = 'method = "task_arithmetic"\nbase = "./base"\nmodels = ["./a"]\n'
    recipe.write_text("#:schema ../hubmerge/data/recipe.schema.json\n" + body)
    out = _merge(recipe, pool / "out").output_dir
    copy = (out / "hubmerge.toml").read_text()
    assert copy == body  # the schema path would point nowhere in the Hub repo
    digest = hashlib.sha256(copy.encode()).hexdigest()
    assert json.loads((out / "hubmerge.lock.json").read_text())["recipe"]["sha256"] == digest
    card = (out / "README.md").read_text()
    assert f"(sha256 `{digest}`)" in card and "#:schema" not in card
    # The lock takes either file: the copy (beside the sources here, which it names relative to itself) and
    # the recipe it came from.
    (pool / "copy.toml").write_text(copy)
    for source in (pool / "copy.toml", recipe):
        assert load_plan_with_lock(source, out / "hubmerge.lock.json")
    url = "#:schema https://example.com/recipe.schema.json\n"  # a URL resolves anywhere: it stays
    recipe.write_text(url + body)
    assert load_recipe(recipe).published_text == url + body


def load_plan_with_lock(recipe: Path, lock: Path) -> bool:
    from hubmerge.publish.lock import apply_lock

    return apply_lock(load_recipe(recipe), lock) is not None


def test_local_output_usage_snippet_loads_the_output_folder(pool: Path) -> None:
    recipe = pool / "tiny-ties.toml"
    recipe.write_text('method = "ties"\nbase = "./base"\nmodels = ["./a"]\n')
    out = _merge(recipe, pool / "tiny-ties").output_dir
    card = (out / "README.md").read_text()
    # Not under the working directory: as seen from its parent (the card holds no absolute path).
    assert 'model_id = "./tiny-ties"\n' in card and str(pool) not in card


def test_local_output_below_the_working_directory_is_named_from_there(
    pool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(pool.parent)
    recipe = pool / "r.toml"
    recipe.write_text('method = "ties"\nbase = "./base"\nmodels = ["./a"]\n')
    out = _merge(recipe, pool / "merged").output_dir
    card = (out / "README.md").read_text()
    usage: dict[str, str] = {}
    exec(re.findall(r"^model_id = .*$", card, flags=re.M)[0], usage)
    assert usage["model_id"] == f"./{pool.name}/merged" and Path(usage["model_id"]).resolve() == out


@pytest.mark.slow
def test_card_command_shows_the_diagnostics_the_merge_wrote(
    pool: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hubmerge.cli import main

    recipe = pool / "r.toml"
    recipe.write_text('method = "ties"\nbase = "./base"\nmodels = ["./a", "./b"]\n')
    out = _merge(recipe, pool / "out", stats=True).output_dir
    written = (out / "README.md").read_text()
    assert "## Merge diagnostics" in written
    assert main(["card", str(recipe), "--output", str(out)]) == 0
    assert capsys.readouterr().out == written
    # Another recipe's output (its lock names another recipe): its diagnostics are not shown.
    recipe.write_text('method = "ties"\nbase = "./base"\nmodels = ["./b", "./a"]\n')
    assert main(["card", str(recipe), "--output", str(out)]) == 0
    assert "## Merge diagnostics" not in capsys.readouterr().out


@pytest.mark.slow  # lm-eval in a process of its own (~40 s here): only a process shows what reaches fd 2
def test_merge_with_eval_prints_the_score_table_and_keeps_library_output_off_stderr(tmp_path: Path) -> None:
    recipe = eval_recipe(tmp_path, eval_table="limit = 4\nbatch_size = 4\nsources = false\n")
    env = {
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "GIT_DIR": str(tmp_path / "none"),  # as outside a repository: lm-eval's `git describe` fails loudly
    }
    result = run_cli(recipe, "--eval", "--no-push", cwd=REPO, env=env)  # the task's data path is relative
    assert result.returncode == 0, result.stderr
    assert "fatal" not in result.stderr and "it/s" not in result.stderr and "%|" not in result.stderr, (
        result.stderr
    )
    assert all(line.startswith(("evaluating ", "warning: ")) for line in result.stderr.splitlines()), (
        result.stderr
    )
    table = result.stdout.split("| Task | Metric | merged |\n|---|---|---|\n")[1]
    assert table.startswith("| `hubmerge_tiny` | `acc,none` | ")
    assert re.fullmatch(r"(\| `hubmerge_tiny` \| `[a-z_]+,none` \| \d\.\d{4} \|\n)+", table), table
