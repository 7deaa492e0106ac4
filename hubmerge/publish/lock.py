"""`hubmerge.lock.json`: what exactly went into a merge and what came out, so it can be reproduced.

Hub sources are recorded by commit sha and the Hub's sha256 of their LFS files; local sources and small
files by the sha256 of the bytes read. `hubmerge RECIPE --lock FILE` pins every Hub source to the
recorded sha and refuses local sources whose bytes changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from .. import __version__
from ..errors import HubmergeError, RecipeError, SourceError
from ..merging.plan import MergePlan, Role
from ..merging.schedule import to_json
from ..recipe.load import Recipe
from .files import CARD_FILE, CHART_FILE, LOCK_FILE, RECIPE_COPY, RESULTS_FILE, STATS_FILE, STATS_PLOTS

__all__ = [
    "LOCK_FILE",
    "RECIPE_COPY",
    "KnownHashes",
    "SourceHashes",
    "Verification",
    "apply_lock",
    "check_reproduced",
    "file_sha256",
    "hash_sources",
    "lock_data",
    "verify_cached",
]

# How a Hub source's weights were checked against the Hub's metadata: the sha256 of every file, or (a
# streamed file not read whole in order) its size and safetensors header.
Verification = Literal["sha256", "size+header"]


def file_sha256(path: Path) -> str:
    digest = _sha256(path, threading.Event())  # an event never set: hash the whole file
    assert digest is not None
    return digest


def _labels(recipe: Recipe) -> list[tuple[str, Any]]:
    pairs: list[tuple[str, Any]] = [("base", recipe.base)] if recipe.base else []
    pairs += [(f"models[{i}]", m) for i, m in enumerate(recipe.models)]
    if recipe.tokenizer:
        pairs.append(("tokenizer", recipe.tokenizer))
    return pairs


def _source_files(plan: MergePlan, folders: Mapping[str, Path]) -> Iterator[tuple[Role, Path, str]]:
    """(role, folder, file) for every file each mention of a source contributes: on disk, or (the weights of
    a streamed source) known by the Hub's sha256."""
    for role in plan.roles:
        source = role.source
        folder = folders[source.key]
        for f in source.needed_files(weights=bool(source.tensors), tokenizer=source is plan.tokenizer):
            if (folder / f).is_file() or f in source.lfs_sha256:
                yield role, folder, f


class SourceHashes:
    """sha256 of source files, computed on a background thread while the merge runs.

    The thread runs at a lower CPU priority (Linux), so it takes the cycles the merge leaves idle (while
    it waits on reads and writes) instead of competing with its arithmetic; whatever is left when the
    merge ends is finished at full speed in `result()`. `cancel()` stops it within one 16 MiB block, so an
    error or Ctrl-C never waits for gigabytes to be hashed.
    """

    def __init__(self, paths: list[Path]) -> None:
        self._stop = threading.Event()
        self._hashes: dict[Path, str] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(paths,), name="hubmerge-hash", daemon=True)
        self._thread.start()

    def _run(self, paths: list[Path]) -> None:
        if sys.platform == "linux":  # per-thread niceness; elsewhere this would renice the whole process
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
        known = KnownHashes.load()
        try:
            for path in paths:
                before = os.stat(path)
                digest = known.get(path, before)
                if digest is None:
                    digest = _sha256(path, self._stop)
                    if digest is None:
                        return
                    known.put(path, before, os.stat(path), digest)
                self._hashes[path] = digest
        except BaseException as exc:  # re-raised by result(), in the caller's thread
            self._error = exc
        finally:
            known.save()

    def result(self) -> dict[Path, str]:
        """Every file's sha256, waiting for the rest (back at normal priority where the OS permits)."""
        if sys.platform == "linux" and self._thread.native_id is not None:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, self._thread.native_id, os.getpriority(os.PRIO_PROCESS, 0))
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._hashes

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()


_NICE = 10
_BLOCK = 2**24
# A file changed less than this before it was hashed may change again within the same timestamp (git's
# "racily clean" entries): its hash is used, but not remembered.
_SETTLED_NS = 2 * 10**9
_MAX_KNOWN = 10_000


def _now_ns() -> int:
    return time.time_ns()


class KnownHashes:
    """sha256 of files hashed by earlier runs, so that merging the same local checkpoints again (or reading
    the same cached Hub files) does not hash gigabytes again.

    An entry holds the file's device, inode, size, mtime and ctime, as git's index does; it is used only while
    all five are unchanged. A program can set a file's mtime but not its ctime, which every write moves, so a
    file rewritten in place is hashed again. Stored in `$HUBMERGE_CACHE/sha256.json` (default
    `~/.cache/hubmerge/`); an unreadable store is ignored, and `HUBMERGE_CACHE=off` disables it.
    """

    def __init__(self, store: Path | None, entries: dict[str, list[Any]]) -> None:
        self.store = store
        self.entries = entries
        self._added: dict[str, list[Any]] = {}

    @staticmethod
    def location() -> Path | None:
        setting = os.environ.get("HUBMERGE_CACHE")
        if setting == "off":
            return None
        folder = (
            Path(setting) if setting else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        )
        return (folder if setting else folder / "hubmerge") / "sha256.json"

    @classmethod
    def load(cls) -> KnownHashes:
        store = cls.location()
        return cls(store, cls._read(store) if store is not None else {})

    @staticmethod
    def _read(store: Path) -> dict[str, list[Any]]:
        try:
            data = json.loads(store.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @staticmethod
    def stamp(st: os.stat_result) -> list[int]:
        """What identifies a file's content without reading it: device, inode, size, mtime and ctime."""
        return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    def get(self, path: Path, st: os.stat_result) -> str | None:
        entry = self.entries.get(str(path.resolve()))
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == self.stamp(st):
            return str(entry[1])
        return None

    def put(self, path: Path, before: os.stat_result, after: os.stat_result, digest: str) -> None:
        """Remember `digest` if the file did not change while hashed, nor shortly before."""
        stamp = self.stamp(before)
        if (
            stamp == self.stamp(after)
            and _now_ns() - max(before.st_mtime_ns, before.st_ctime_ns) > _SETTLED_NS
        ):
            self._added[str(path.resolve())] = [stamp, digest]

    def save(self) -> None:
        """Add this run's entries to the store (re-read first: other runs may have written it meanwhile)."""
        if self.store is None or not self._added:
            return
        with contextlib.suppress(OSError):
            entries = self._read(self.store) | self._added
            if len(entries) > _MAX_KNOWN:  # the oldest entries first out: dicts keep insertion order
                entries = dict(list(entries.items())[-_MAX_KNOWN:])
            self.store.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.store.with_name(f".{self.store.name}.{os.getpid()}.tmp")
            temporary.write_text(json.dumps(entries))
            os.replace(temporary, self.store)


def _sha256(path: Path, stop: threading.Event) -> str | None:
    """The file's sha256, or None if `stop` was set first."""
    digest = hashlib.sha256()
    buffer = bytearray(_BLOCK)  # reused: no 16 MiB allocation per block
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            if stop.is_set():
                return None
            digest.update(view[:n])
    return digest.hexdigest()


def hash_sources(plan: MergePlan, folders: Mapping[str, Path]) -> SourceHashes:
    """Start hashing the source files on disk: the ones whose sha256 the Hub did not give us (local sources:
    gigabytes), and the downloaded ones it did, to check them (`verify_cached`)."""
    return SourceHashes(
        sorted({folder / f for _, folder, f in _source_files(plan, folders) if (folder / f).is_file()})
    )


def verify_cached(plan: MergePlan, folders: Mapping[str, Path], hashes: Mapping[Path, str]) -> None:
    """Every Hub file read from the cache has the sha256 the Hub lists for it; raises `SourceError` naming
    the first that does not (huggingface_hub checks the size of a download, not its content)."""
    for role, folder, f in _source_files(plan, folders):
        expected = role.source.lfs_sha256.get(f)
        actual = hashes.get(folder / f)
        if expected is not None and actual is not None and actual != expected:
            raise SourceError(
                f"{role.source.label}: {folder / f} has sha256 {actual} but the Hub lists {expected}; the cached "
                "copy is damaged: delete it (`hf cache rm`) and run again"
            )


def lock_data(
    plan: MergePlan,
    folders: Mapping[str, Path],
    output: Path,
    output_files: Mapping[str, str | None],
    source_hashes: Mapping[Path, str],
    device: str,
    uploaded: Mapping[str, int] | None = None,
    verified: Mapping[str, Verification] | None = None,
) -> dict[str, Any]:
    """The lock document; `output_files` maps each output file to its sha256 when already known.

    `uploaded` gives the sizes of output files no longer in `output` (pushed, then deleted to save disk);
    their sha256 must be in `output_files`. `verified` says how each Hub source (by first mention) was
    checked against the Hub's metadata.
    """
    gone = uploaded or {}
    import torch

    sources: dict[str, dict[str, Any]] = {}
    for role, folder, f in _source_files(plan, folders):
        source, ref = role.source, role.ref
        entry = sources.setdefault(
            role.name,
            {
                "role": role.name,
                "reference": ref.text,
                "repo_id": ref.repo_id,
                "revision": ref.revision,
                "sha": source.sha,
                # Relative to the recipe's folder: the lock is published, an absolute path would leak the
                # machine's layout and mean nothing elsewhere.
                "path": Path(os.path.relpath(ref.path, plan.recipe.path.parent)).as_posix()
                if ref.path
                else None,
                "files": {},
                "verified": (verified or {}).get(role.name),
            },
        )
        if (folder / f).is_file():
            sha = source.lfs_sha256.get(f) or source_hashes.get(folder / f) or file_sha256(folder / f)
            entry["files"][f] = {"size": (folder / f).stat().st_size, "sha256": sha}
        elif entry["verified"] == "sha256":  # streamed: never on disk, every byte read proven (remote.py)
            entry["files"][f] = {"size": source.files[f], "sha256": source.lfs_sha256[f]}
        else:  # streamed without verification: the Hub's sha256, named as such, never claimed as checked
            entry["files"][f] = {"size": source.files[f], "hub_sha256": source.lfs_sha256[f]}
    return {
        "hubmerge_version": __version__,
        "torch_version": torch.__version__,
        "device": device,
        "recipe": {"file": plan.recipe.path.name, "sha256": plan.recipe.sha256},
        "method": plan.recipe.method.name,
        "parameters": {k: to_json(v) for k, v in plan.recipe.parameters.items()},
        "sources": list(sources.values()),
        "output": {
            "files": {
                f: {"size": gone[f], "sha256": output_files[f]}
                if f in gone
                else {
                    "size": (output / f).stat().st_size,
                    "sha256": output_files[f] or file_sha256(output / f),
                }
                for f in sorted(output_files)
            }
        },
    }


def apply_lock(recipe: Recipe, lock_path: Path) -> Recipe:
    """The recipe with every Hub source pinned to the sha recorded in `lock_path`."""
    try:
        lock = json.loads(lock_path.read_text())
        recorded = {entry["role"]: entry for entry in lock["sources"]}
        recipe_sha = lock["recipe"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RecipeError(f"{lock_path}: not a readable {LOCK_FILE} ({exc})") from None
    if recipe_sha != recipe.sha256:
        raise RecipeError(
            f"{lock_path} was written for another version of {recipe.path.name} (recipe sha256 differs); "
            f"use the recipe stored beside it as {RECIPE_COPY}"
        )
    pinned: dict[str, Any] = {}
    for label, ref in _labels(recipe):
        entry = recorded.get(label)
        if entry is None:
            raise RecipeError(f"{lock_path} has no entry for {label}")
        if ref.repo_id is not None:
            pinned[label] = dataclasses.replace(ref, revision=entry["sha"])
        else:
            for name, meta in entry["files"].items():
                path = ref.path / name
                if not path.is_file() or file_sha256(path) != meta["sha256"]:
                    raise RecipeError(f"{label}: {path} differs from the bytes recorded in {lock_path}")
            pinned[label] = ref
    return dataclasses.replace(
        recipe,
        # The lock names the recipe as it was first written; the copy beside the output is hubmerge.toml.
        # Keeping the first name keeps the card's title, the lock and the commit message identical.
        path=recipe.path.with_name(str(lock["recipe"].get("file") or recipe.path.name)),
        base=pinned.get("base", recipe.base),
        models=tuple(pinned[f"models[{i}]"] for i in range(len(recipe.models))),
        tokenizer=pinned.get("tokenizer", recipe.tokenizer),
    )


def _reports() -> set[str]:
    """The files that report on a merge rather than make up the model: the diagnostics and their plots, the
    evaluation and sanity results and their chart."""

    return {STATS_FILE, *(file for file, _ in STATS_PLOTS.values()), RESULTS_FILE, CHART_FILE}


def check_reproduced(lock_path: Path, record: Mapping[str, Any]) -> None:
    """Fail unless `record` (this run's lock) has the model that `lock_path` records: the same files, byte
    for byte, among the model's files (weights, index, config, tokenizer, recipe copy, license).

    Left out: the card (without an [output] repo its usage snippet names the output folder, which a
    reproduction is free to choose) and the reports (merge_stats.json, eval_results.json and their charts),
    which `--no-stats`, `--no-sanity` and `--eval` turn on and off without changing a weight. A model file
    that only one of the two runs produced is named as such, not as differing.
    """
    lock = json.loads(lock_path.read_text())
    skip = {CARD_FILE, *_reports()}
    expected = {
        n: e.get("sha256") for n, e in lock.get("output", {}).get("files", {}).items() if n not in skip
    }
    actual = {n: e["sha256"] for n, e in record["output"]["files"].items() if n not in skip}
    problems = []
    differing = sorted(n for n in expected.keys() & actual.keys() if expected[n] != actual[n])
    if differing:
        problems.append(f"{', '.join(differing)} differ")
    if missing := sorted(expected.keys() - actual.keys()):
        problems.append(f"{', '.join(missing)} not produced by this run")
    if extra := sorted(actual.keys() - expected.keys()):
        problems.append(f"{', '.join(extra)} not in the lock")
    if not problems:
        return
    environment = [
        f"{key.replace('_version', '')} {lock.get(key, 'unrecorded')} then, {record[key]} now"
        for key in ("hubmerge_version", "torch_version", "device")
        if lock.get(key) != record[key]
    ]
    sources = [
        s["role"]
        for s, r in zip(lock.get("sources", []), record["sources"], strict=False)
        if s.get("files") != r["files"] or s.get("sha") != r["sha"]
    ]
    causes = environment + ([f"sources differ: {', '.join(sources)}"] if sources else [])
    raise HubmergeError(
        f"the merge did not reproduce {lock_path}: {'; '.join(problems)} "
        f"({'; '.join(causes) or 'same hubmerge, torch, device and sources'}); the previous output was kept"
    )
