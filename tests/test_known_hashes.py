"""Remembered sha256 of source files (`lock.KnownHashes`): merging unchanged local checkpoints again hashes
nothing again; a file rewritten in place is hashed again even with its old mtime; a file that changed just
before it was hashed is not remembered."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support.checkpoints import random_state_dict, write_checkpoint

import hubmerge
from hubmerge.publish import lock

RECIPE = 'method = "task_arithmetic"\nbase = "./base"\nmodels = ["./a", "./b"]\n'


@pytest.fixture
def pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        write_checkpoint(tmp_path / name, random_state_dict(seed))
    (tmp_path / "recipe.toml").write_text(RECIPE)
    monkeypatch.setenv("HUBMERGE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _merge(pool: Path, monkeypatch: pytest.MonkeyPatch, out: str) -> tuple[list[Path], dict]:
    """Merge in this process; return the source files hashed, and the lock's sources."""
    hashed: list[Path] = []
    real = lock._sha256

    def counting(path: Path, stop):  # type: ignore[no-untyped-def]
        hashed.append(path)
        return real(path, stop)

    monkeypatch.setattr(lock, "_sha256", counting)
    hubmerge.merge(pool / "recipe.toml", output_dir=pool / out, push=False, quiet=True, log=lambda _: None)
    sources = [p for p in hashed if p.parent.name in ("base", "a", "b")]  # not the output's files
    return sources, json.loads((pool / out / lock.LOCK_FILE).read_text())["sources"]


def _settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hash as if the sources had been written long before (their mtime and ctime are seconds old)."""
    real = lock._now_ns
    monkeypatch.setattr(lock, "_now_ns", lambda: real() + 10 * 10**9)


@pytest.mark.slow
def test_a_second_merge_of_unchanged_sources_hashes_nothing_again(
    pool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _settled(monkeypatch)
    first, sources = _merge(pool, monkeypatch, "out1")
    assert {p.parent.name for p in first} == {"base", "a", "b"}
    assert sum(p.name == "model.safetensors" for p in first) == 3
    again, sources_again = _merge(pool, monkeypatch, "out2")
    assert again == []
    assert sources_again == sources  # the remembered sha256 are the ones the first run computed
    assert (pool / "cache" / "sha256.json").is_file()


@pytest.mark.slow
def test_a_source_rewritten_in_place_with_its_old_mtime_is_hashed_again(
    pool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _settled(monkeypatch)
    _, sources = _merge(pool, monkeypatch, "out1")
    weights = pool / "a" / "model.safetensors"
    before = os.stat(weights)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: same size, other content
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime as it was; ctime moves
    again, sources_again = _merge(pool, monkeypatch, "out2")
    assert again == [weights]
    old = next(s for s in sources if s["role"] == "models[0]")["files"]["model.safetensors"]
    new = next(s for s in sources_again if s["role"] == "models[0]")["files"]["model.safetensors"]
    assert old != new and new["sha256"] == lock.file_sha256(weights)


@pytest.mark.slow
def test_files_changed_just_before_they_were_hashed_are_not_remembered(
    pool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hashed 1 s after the sources' last change (the clock pinned, so no test machine is too slow for it).
    last_change = max(
        max(p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in pool.glob("*/*") if p.is_file()
    )
    monkeypatch.setattr(lock, "_now_ns", lambda: last_change + 10**9)
    first, _ = _merge(pool, monkeypatch, "out1")
    assert first
    again, _ = _merge(pool, monkeypatch, "out2")
    assert sorted(again) == sorted(first)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["off", "damaged"])
def test_a_damaged_store_is_ignored_and_off_stores_nothing(
    pool: Path, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    _settled(monkeypatch)
    store = pool / "cache" / "sha256.json"
    if setting == "off":
        monkeypatch.setenv("HUBMERGE_CACHE", "off")
    else:
        store.parent.mkdir()
        store.write_text("{not json")
    first, _ = _merge(pool, monkeypatch, "out1")
    again, _ = _merge(pool, monkeypatch, "out2")
    if setting == "off":
        assert sorted(again) == sorted(first) and not store.exists()
    else:
        assert first and again == []
