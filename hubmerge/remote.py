"""Reading a Hub source's weights by byte range, without downloading them (the `streaming` strategy).

Ranges go through `huggingface_hub`'s `HfFileSystem` (tokens, endpoint, its retries with backoff on 5xx,
timeouts and dropped connections), a part of at most `_PART` bytes per request, so a failure costs one
part, not a file. Files already in the local Hugging Face cache are read from it, never fetched again.

Every file is checked against the Hub's metadata before its first tensor is used: its safetensors header
(dtypes, shapes, offsets) must describe exactly the file size the Hub reports and the tensors the plan
was made from. Bytes are also hashed as long as they arrive in file order; a file read whole that way is
checked against its LFS sha256, and a mismatch is an error naming the file (`verified` records which).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from .checkpoint import LocalFile, RangeSource, header_of, header_tensors
from .errors import SourceError
from .sources import Source, hub_errors

__all__ = ["RemoteFolder", "Verified"]

Verified = Literal["sha256", "size+header"]
_PART = 16 * 2**20  # bytes per range request
_ATTEMPTS = 3  # a part whose answer came back short is asked for again this many times in all


class RemoteFolder:
    """A Hub source's weight files at its resolved commit, opened as `RangeSource`s (a `checkpoint.Opener`).

    `on_bytes` is called with the number of bytes fetched from the network (for progress and measures).
    """

    def __init__(self, source: Source, on_bytes: Callable[[int], None] | None = None) -> None:
        from huggingface_hub import HfFileSystem

        assert source.ref.repo_id is not None and source.sha is not None
        self.source = source
        self.repo_id = source.ref.repo_id
        self.sha = source.sha
        self.fs = HfFileSystem()
        self.on_bytes = on_bytes
        self.fetched = 0
        self.verified: dict[str, Verified] = {}  # file -> how it was verified, once opened
        self._lock = threading.Lock()
        # One fetch ahead per open file at most; the engine's own read thread waits on it when it arrives.
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hubmerge-fetch")
        self._open: list[RangeSource] = []

    def open(self, file: str) -> tuple[RangeSource, int]:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(self.repo_id, file, revision=self.sha)
        size = self.source.files.get(file, 0)
        handle: RangeSource
        if isinstance(cached, str):
            handle = _Hashed(LocalFile(Path(cached)), self, file)
        else:
            handle = _Hashed(_HubFile(self, file, size), self, file)
        fix = (
            f"the Hub's copy of {self.repo_id}@{self.sha[:12]} is damaged or changed; report it to its owners"
        )
        header, start = header_of(handle, fix)
        where = f"{self.repo_id}@{self.sha[:12]}/{file}"
        # Exact, now: the Hub's file size must equal the end of the data the header describes.
        found = header_tensors(header, file, where, handle.size - start, exact=True)
        expected = {n: t for n, t in self.source.tensors.items() if t.file == file}
        if found != expected:
            raise SourceError(f"{where}: its header differs from the one read when planning; {fix}")
        if handle.size != size:
            raise SourceError(f"{where} holds {handle.size} bytes but the Hub lists {size}; {fix}")
        self.verified.setdefault(file, "size+header")
        self._open.append(handle)
        return handle, start

    def verification(self) -> Verified:
        """How the weight files were verified: sha256 when every one was read whole, else size+header."""
        files = {t.file for t in self.source.tensors.values()}
        return "sha256" if all(self.verified.get(f) == "sha256" for f in files) else "size+header"

    def count(self, n: int) -> None:
        with self._lock:
            self.fetched += n
        if self.on_bytes is not None:
            self.on_bytes(n)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _HubFile:
    """One Hub file read by range through `HfFileSystem`; one range fetched ahead on the folder's pool."""

    def __init__(self, folder: RemoteFolder, file: str, size: int) -> None:
        self.folder = folder
        self.file = file
        self.size = size
        self.name = f"{folder.repo_id}@{folder.sha[:12]}/{file}"
        self._lock = threading.Lock()
        self._ahead: tuple[int, int, Future[bytes]] | None = None
        with self._errors():
            self._handle: Any = folder.fs.open(
                f"{folder.repo_id}/{file}",
                "rb",
                revision=folder.sha,
                block_size=_PART,
                cache_type="none",  # we fetch exactly what the engine asks for, and one range ahead
                size=size,
            )

    def _errors(self) -> Any:
        return hub_errors(self.folder.source.label, self.folder.repo_id, self.folder.sha)

    def _fetch(self, offset: int, n: int) -> bytes:
        parts = []
        for start in range(offset, offset + n, _PART):
            parts.append(self._part(start, min(_PART, offset + n - start)))
        return b"".join(parts)

    def _part(self, start: int, n: int) -> bytes:
        got = 0
        for _ in range(_ATTEMPTS):
            # huggingface_hub retries 5xx, timeouts and dropped connections itself (with backoff); what it
            # lets through is final, except a short answer, which is asked for again.
            with self._errors(), self._lock:
                self._handle.seek(start)
                data = bytes(self._handle.read(n))
            if len(data) == n:
                self.folder.count(n)
                return data
            got = len(data)
        raise SourceError(
            f"{self.folder.source.label}: {self.name}: the Hub answered {got} of {n} bytes at offset {start}, "
            f"{_ATTEMPTS} times; check your network and run again"
        )

    def readinto(self, offset: int, view: memoryview) -> None:
        n = len(view)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (offset, n):
            data = ahead[2].result()
        else:
            if ahead is not None:
                ahead[2].cancel()
            data = self._fetch(offset, n)
        view[:] = data

    def prefetch(self, offset: int, n: int) -> None:
        if self._ahead is None:
            self._ahead = (offset, n, self.folder.pool.submit(self._fetch, offset, n))

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead[2].cancel()
            self._ahead = None
        self._handle.close()


class _Hashed:
    """A `RangeSource` that hashes the bytes read while they arrive in file order, and checks the file's
    LFS sha256 once all of it has passed through."""

    def __init__(self, inner: RangeSource, folder: RemoteFolder, file: str) -> None:
        self.inner = inner
        self.folder = folder
        self.file = file
        self.name = inner.name
        self.size = inner.size
        self.expected = folder.source.lfs_sha256.get(file)
        self._digest = hashlib.sha256()
        self._hashed = 0

    def readinto(self, offset: int, view: memoryview) -> None:
        self.inner.readinto(offset, view)
        if self.expected is None or not offset <= self._hashed < offset + len(view):
            return
        self._digest.update(view[self._hashed - offset :])
        self._hashed = offset + len(view)
        if self._hashed == self.size:
            if self._digest.hexdigest() != self.expected:
                raise SourceError(
                    f"{self.folder.source.label}: {self.name}: its sha256 is {self._digest.hexdigest()} but the "
                    f"Hub lists {self.expected}; the bytes were damaged on the way or on the Hub; run again, and "
                    "report it to the repo's owners if it persists"
                )
            self.folder.verified[self.file] = "sha256"

    def prefetch(self, offset: int, n: int) -> None:
        self.inner.prefetch(offset, n)

    def close(self) -> None:
        self.inner.close()
