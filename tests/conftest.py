"""Shared fixtures: the tiny checkpoints a test makes, a recipe writer, a private hash cache and no sanity check.

The helpers they use, and every helper a test module shares, live in the `support` package (tests/support/);
no test module imports another, nor this file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.checkpoints import VOCAB, random_state_dict, write_checkpoint

# Modules whose module-scoped fixture is a process or a cluster, seconds to start: their tests run on one
# pytest-xdist worker, so that it starts once. (xdist's own `xdist_group` mark does not group under pytest 9.2,
# which no longer reads the node id xdist rewrites.)
_ONE_WORKER = {"test_search_ray.py", "test_ui_api.py", "test_ui_browser.py", "test_ui_public.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (pyproject's addopts), the `slow` tests are handed out first and the quick ones fill
    in behind them, so that no long test starts last and runs alone while the other workers idle. Each worker
    collects, and sorts, the same list; a run without workers keeps the files' order."""
    if hasattr(config, "workerinput"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's `load` distribution (a test at a time to whichever worker is free), except that the tests of a
    module in `_ONE_WORKER` go together to one worker; groups are handed out first, largest first."""
    if config.getvalue("dist") != "load":
        return None  # `--dist` chosen on the command line: xdist's own
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerModules(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if Path(module).name in _ONE_WORKER else nodeid

    return OneWorkerModules(config, log)


@pytest.fixture(scope="session")
def known_hashes_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hubmerge-cache")


@pytest.fixture(autouse=True)
def private_known_hashes(monkeypatch: pytest.MonkeyPatch, known_hashes_store: Path) -> None:
    """The remembered sha256 of source files (`lock.KnownHashes`) go to a folder of this test session, not to
    the user's ~/.cache (`HUBMERGE_CACHE`, inherited by CLI subprocesses)."""
    monkeypatch.setenv("HUBMERGE_CACHE", str(known_hashes_store))


@pytest.fixture(autouse=True)
def no_sanity_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Merges skip the quick sanity check: it imports transformers' tokenizer and runs a forward pass per model
    (seconds of CPU per tiny merge), and only tests/test_eval.py and tests/test_sanity.py test it (their own
    fixtures turn it back on by removing `HUBMERGE_NO_SANITY`). The CLI (in process or a subprocess, which
    inherits the variable) and the web app read the variable; `hubmerge.merge` called as a library does not,
    so its check is gated on the variable here, at call time."""
    from hubmerge import api

    monkeypatch.setenv("HUBMERGE_NO_SANITY", "1")
    check = api._sanity_check

    def gated(*args: Any, **kwargs: Any) -> Any:
        return None if os.environ.get("HUBMERGE_NO_SANITY") else check(*args, **kwargs)

    monkeypatch.setattr(api, "_sanity_check", gated)


@pytest.fixture
def make_model(tmp_path: Path) -> Callable[..., Path]:
    """`make_model(name, seed, **write_checkpoint options)` → folder under tmp_path/models."""

    def make(name: str, seed: int, head: bool = False, vocab: int = VOCAB, **options: object) -> Path:
        return write_checkpoint(tmp_path / "models" / name, random_state_dict(seed, vocab, head), **options)  # type: ignore[arg-type]

    return make


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


class _TimeWithoutSleep:
    """The `time` module as the retrying modules see it under `no_retry_waits`: sleeps return at once."""

    def __getattr__(self, name: str) -> Any:
        import time

        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        pass


@pytest.fixture
def no_retry_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub retries a failed request after waiting 1, 2, 4, 8, 8 s (`http_backoff`), and hubmerge a
    metadata call after 1, 2, 4 s (`resolve._retrying`). For the tests that make the local Hub fail on purpose,
    in this process: the same retries and the same outcome, without the waits (tens of seconds per test)."""
    from huggingface_hub.utils import _http

    from hubmerge.sources import resolve

    monkeypatch.setattr(_http, "time", _TimeWithoutSleep())
    monkeypatch.setattr(resolve, "time", _TimeWithoutSleep())
