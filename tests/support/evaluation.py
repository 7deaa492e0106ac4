"""The recipe the evaluation tests merge and evaluate: the tiny pool with the offline task in tests/data."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.checkpoints import REPO, TINY

TASKS = REPO / "tests" / "data" / "lm_eval"


def lm_eval_offline(monkeypatch: pytest.MonkeyPatch, hf_home: Path) -> None:
    """lm-eval and datasets never reach the network, run from the repository (tasks name their data files
    relative to it), and cache their results under `hf_home`, a folder of the test."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def eval_recipe(
    folder: Path,
    scaling_factor: float = 0.8,
    eval_table: str = "limit = 8\nbatch_size = 8\n",
    name: str = "recipe.toml",
    output: str = "out",
) -> Path:
    path = folder / name
    path.write_text(
        'method = "task_arithmetic"\n'
        f'base = "{TINY / "base"}"\n'
        f'models = ["{TINY / "math"}", "{TINY / "coder"}", "{TINY / "instruct"}"]\n'
        f"[parameters]\nscaling_factor = {scaling_factor}\n"
        f'[output]\ndir = "{output}"\n'
        f'[eval]\ntasks = ["hubmerge_tiny"]\ninclude_path = "{TASKS}"\n{eval_table}'
    )
    return path
