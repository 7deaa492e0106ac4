"""What the `hubmerge search` tests share: one torch thread for tiny models, the grid of scaling factors, and
the recipe over the base, math and code checkpoints that `make_model` writes under ./models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

GRID = """sampler = "grid"
[search.space]
"parameters.scaling_factor" = { low = 0.25, high = 1.25, step = 0.5 }
"""


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tiny models on one torch thread: on a busy two-core machine, a second thread's waits cost seconds.
    Autouse in each module that imports it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the subprocesses'
    yield
    torch.set_num_threads(threads)


def search_recipe(folder: Path, search_table: str, method: str = "task_arithmetic") -> Path:
    """`folder`/recipe.toml: `method` over ./models/{base,math,code} with `search_table` as its [search]."""
    path = folder / "recipe.toml"
    models = '["./models/math", "./models/code"]'
    base = 'base = "./models/base"\n'
    if method == "linear":
        base, models = "", '["./models/math", { source = "./models/code", weight = 1.0 }]'
    path.write_text(
        f'method = "{method}"\n{base}models = {models}\n[search]\n{search_table}', encoding="utf-8"
    )
    return path
