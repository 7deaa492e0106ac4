"""Sources: turn each model reference into a `Source` (resolved revision, files, config, tensor headers),
and later fetch the files a merge needs.

Resolution reads only metadata: the Hub API for the commit sha and file list, `config.json`, and the
safetensors headers through HTTP range requests, so a wrong recipe fails in seconds instead of after
gigabytes of downloads. Hub sources are pinned to the resolved sha from then on; downloads go to the
standard Hugging Face cache, so `HF_HUB_OFFLINE=1`, `HF_TOKEN`, `hf auth login` and `hf cache` work as usual.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from ..errors import SourceError
from ..publish.files import CARD_FILE, CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from ..recipe.reference import ModelRef
from .checkpoint import (
    TensorInfo,
    add_tensors,
    header_tensors,
    index_folder,
    select_weights,
)

__all__ = ["LICENSE_FILES", "TOKENIZER_FILES", "Source", "fetch", "resolve"]

T = TypeVar("T")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# What every source contributes besides weights: its config and what the card needs (license, metadata).
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md")
_ALWAYS = (CONFIG_FILE, CARD_FILE, *LICENSE_FILES)


@dataclass(frozen=True)
class Source:
    """A model reference resolved to something exact: a local folder, or a Hub repo at a commit sha."""

    ref: ModelRef
    label: str  # e.g. "models[1] (Qwen/Qwen2.5-Coder-1.5B)", for messages
    config: Mapping[str, Any]
    tensors: Mapping[str, TensorInfo]
    files: Mapping[str, int]  # every file of the repo or folder -> size in bytes
    card_data: Mapping[str, Any] | None  # README.md front matter
    sha: str | None = None  # resolved commit, for Hub sources
    lfs_sha256: Mapping[str, str] = field(default_factory=dict)  # Hub-side sha256 of LFS files
    gated: bool = False
    # The recipe key of the mention it was resolved for ("base", "models[1]", "tokenizer"): a source named
    # twice is resolved once, so this keys it, stably, wherever a run keeps something per source.
    key: str = ""

    @property
    def weight_files(self) -> tuple[str, ...]:
        files = {t.file for t in self.tensors.values()}
        # The index is part of the weights only when it chose them (no model.safetensors beside it).
        return tuple(sorted(files | ({INDEX_FILE} & set(self.files) if SINGLE_FILE not in files else set())))

    def needed_files(self, weights: bool, tokenizer: bool) -> tuple[str, ...]:
        wanted = (
            set(_ALWAYS)
            | (set(self.weight_files) if weights else set())
            | (set(TOKENIZER_FILES) if tokenizer else set())
        )
        return tuple(sorted(f for f in self.files if f in wanted))


def resolve(ref: ModelRef, label: str, weights: bool = True) -> Source:
    """Resolve a reference without downloading weights. `weights=False` for a tokenizer-only source."""
    key, label = label, f"{label} ({ref.text})"
    try:
        source = (
            _resolve_local(ref, label, weights) if ref.path is not None else _resolve_hub(ref, label, weights)
        )
    except _Unreachable:
        if ref.near is None:
            raise
        # `tiny/mathh` next to a `tiny/` folder: a mistyped local folder rather than a Hub repo.
        raise SourceError(
            f"{label}: no such folder {ref.near} (relative to the recipe's folder), and no Hub repo {ref.repo_id} "
            "either; prefix local folders with ./"
        ) from None
    return replace(source, key=key)


def _read_json(path: Path, label: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(
            f"{label}: no {path.name} in {path.parent}; is it a transformers model folder?"
        ) from None
    except ValueError as exc:
        raise SourceError(f"{label}: {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{label}: {path} is not a JSON object")
    return data


def _front_matter(path: Path) -> dict[str, Any] | None:
    from huggingface_hub.repocard import metadata_load

    if not path.is_file():
        return None
    try:
        return metadata_load(path)
    except Exception:  # a README with broken YAML simply carries no metadata
        return None


def _resolve_local(ref: ModelRef, label: str, weights: bool) -> Source:
    folder = ref.path
    assert folder is not None
    if not folder.is_dir():
        raise SourceError(f"{label}: no such folder {folder}")
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    return Source(
        ref=ref,
        label=label,
        config=_read_json(folder / CONFIG_FILE, label),
        tensors=index_folder(folder, label) if weights else {},
        files=files,
        card_data=_front_matter(folder / CARD_FILE),
    )


class _Unreachable(SourceError):
    """The repo is not on the Hub, or the Hub cannot be asked: what a mistyped local folder ends in."""


@contextlib.contextmanager
def hub_errors(label: str, repo_id: str, revision: str | None) -> Iterator[None]:
    """Translate huggingface_hub's exceptions into one line that says what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = f"{constants.ENDPOINT}/{repo_id}"
    try:
        yield
    except GatedRepoError:
        raise SourceError(
            f"{label}: {repo_id} is gated; accept its terms at {url} and use a token of that account "
            "(HF_TOKEN or `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        hint = (
            "check the id"
            if os.environ.get("HF_TOKEN")
            else "check the id, or log in (HF_TOKEN or `hf auth login`) if it is private"
        )
        raise _Unreachable(
            f"{label}: repository {repo_id} not found on {constants.ENDPOINT}; {hint}"
        ) from None
    except RevisionNotFoundError:
        raise SourceError(
            f"{label}: revision {revision!r} not found in {repo_id}; use a branch, tag or commit sha listed at {url}"
        ) from None
    except RemoteEntryNotFoundError as exc:
        raise SourceError(f"{label}: a file is missing from {repo_id}@{revision}: {exc}") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, IncompleteSnapshotError):
        raise _Unreachable(
            f"{label}: cannot reach {constants.ENDPOINT} and {repo_id}@{revision or 'main'} is not in the cache; "
            "check your network, or run once online (unset HF_HUB_OFFLINE)"
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        if status == 401:
            raise SourceError(
                f"{label}: the Hub rejected the token (401); run `hf auth login` or fix HF_TOKEN"
            ) from None
        raise SourceError(
            f"{label}: the Hub answered {status} for {repo_id}; try again later ({exc})"
        ) from None
    except OSError as exc:  # connection refused, DNS failure, disk full while caching
        raise _Unreachable(
            f"{label}: cannot reach {constants.ENDPOINT} ({exc}); check your network"
        ) from None
    except Exception as exc:
        if type(exc).__module__.startswith(("httpx", "httpcore")):
            raise _Unreachable(
                f"{label}: cannot reach {constants.ENDPOINT} ({exc}); check your network"
            ) from None
        raise


def _retrying(call: Callable[[], T]) -> T:
    """Retry a metadata call on 429/5xx and dropped connections (downloads have the client's own retries)."""
    from huggingface_hub.errors import HfHubHTTPError

    for wait in (1, 2, 4, None):
        try:
            return call()
        except (HfHubHTTPError, OSError) as exc:
            response = getattr(exc, "response", None)
            transient = response is None or response.status_code == 429 or response.status_code >= 500
            if wait is None or not transient or isinstance(exc, _permanent()):
                raise
        time.sleep(wait)
    raise AssertionError("unreachable")


def _permanent() -> tuple[type[Exception], ...]:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    return (
        RepositoryNotFoundError,
        RevisionNotFoundError,
        GatedRepoError,
        EntryNotFoundError,
        OfflineModeIsEnabled,
    )


def _resolve_hub(ref: ModelRef, label: str, weights: bool) -> Source:
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

    repo_id = ref.repo_id
    assert repo_id is not None
    revision = ref.revision or "main"
    if constants.HF_HUB_OFFLINE:
        # Offline: the cache is the only truth. Resolve the revision through the cache's refs.
        with hub_errors(label, repo_id, revision):
            folder = Path(
                snapshot_download(
                    repo_id, revision=revision, allow_patterns=[CONFIG_FILE], local_files_only=True
                )
            )
        local = _resolve_local(ModelRef(ref.text, path=folder), f"{label} (offline, from the cache)", weights)
        return Source(ref, label, local.config, local.tensors, local.files, local.card_data, sha=folder.name)

    api = HfApi()
    with hub_errors(label, repo_id, revision):
        info = _retrying(lambda: api.model_info(repo_id, revision=revision, files_metadata=True))
        sha = info.sha
        assert sha is not None
        files = {s.rfilename: s.size or 0 for s in info.siblings or []}
        lfs = {s.rfilename: s.lfs.sha256 for s in info.siblings or [] if s.lfs is not None}
        if weights:  # the rule the offline path and transformers apply to the same listing
            select_weights(files, f"{label}: {repo_id}@{sha[:12]}")
        if CONFIG_FILE not in files:
            raise SourceError(
                f"{label}: {repo_id}@{sha[:12]} has no config.json; is it a transformers model?"
            )
        # Downloading by the revision's name (not the sha) records the name -> sha ref in the cache,
        # which is what lets a later HF_HUB_OFFLINE=1 run resolve the same recipe.
        config_path = Path(hf_hub_download(repo_id, CONFIG_FILE, revision=revision))
        if config_path.parent.name != sha:
            raise SourceError(f"{label}: {repo_id}@{revision} moved while it was being resolved; run again")
        config = _read_json(config_path, label)
        tensors: dict[str, TensorInfo] = {}
        if weights:
            metadata = _retrying(lambda: api.get_safetensors_metadata(repo_id, revision=sha))
            for file, file_metadata in metadata.files_metadata.items():
                header = {
                    name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)}
                    for name, t in file_metadata.tensors.items()
                }
                # The Hub gives the file's size, not its header's: the data must fit in what is left.
                found = header_tensors(
                    header, file, f"{repo_id}@{sha[:12]}/{file}", files.get(file, 0) - 8, False
                )
                add_tensors(tensors, found, label)
    card_data = info.card_data.to_dict() if info.card_data is not None else None  # type: ignore[no-untyped-call]
    return Source(
        ref, label, config, tensors, files, card_data, sha=sha, lfs_sha256=lfs, gated=bool(info.gated)
    )


def fetch(source: Source, weights: bool, tokenizer: bool, quiet: bool, stream: bool = False) -> Path:
    """Make the needed files local and return the folder (the snapshot folder for Hub sources).

    `stream`: the weights are read by range later (remote.py); only their index is downloaded here.
    """
    if source.ref.path is not None:
        return source.ref.path
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils.tqdm import disable_progress_bars

    if quiet:
        disable_progress_bars()
    repo_id = source.ref.repo_id
    assert repo_id is not None
    with hub_errors(source.label, repo_id, source.sha):
        return Path(
            snapshot_download(
                repo_id,
                revision=source.sha,
                allow_patterns=[
                    f
                    for f in source.needed_files(weights, tokenizer)
                    if not (stream and f.endswith(".safetensors"))
                ],
            )
        )


def cached_files(source: Source, files: tuple[str, ...]) -> set[str]:
    """Which of `files` are already in the local cache at the source's sha."""
    if source.ref.path is not None:
        return set(files)
    from huggingface_hub import try_to_load_from_cache

    return {
        f
        for f in files
        if isinstance(try_to_load_from_cache(source.ref.repo_id or "", f, revision=source.sha), str)
    }
