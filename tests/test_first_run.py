"""What a new user meets on a first run: the output folder's permissions, warnings on settings that are
valid but rarely meant, and the messages of validate, --eval, card and --lock."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import random_state_dict, write_checkpoint

from hubmerge import api
from hubmerge.recipe import load_recipe


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
