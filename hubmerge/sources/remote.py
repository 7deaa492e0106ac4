"""Reading a Hub source's weights by byte range, without downloading them (the `streaming` strategy).

Ranges go through `huggingface_hub`'s `HfFileSystem` (tokens, endpoint, its retries with backoff on 5xx,
timeouts and dropped connections), a part of at most `_PART` bytes per request, so a failure costs one
part, not a file; the small tensors of a decoder layer, contiguous in the file, are fetched in one request
(`_HubFile._run_end`). Files already in the local Hugging Face cache are read from it, never fetched again.

Every file is checked against the Hub's metadata before its first tensor is used: its safetensors header
(dtypes, shapes, offsets) must describe exactly the file size the Hub reports and the tensors the plan
was made from. With `verify` (the default, `[output] verify_streamed`), every byte the merge reads is also
proven to be the Hub's: each read is recorded by its sha256, and `prove_all` reads what did not
arrive in file order once more to check the file's LFS sha256 (`_FileCheck`), before the output is kept or
pushed. A mismatch is an error naming the file; `verified` records which files were proven.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from ..errors import SourceError
from .checkpoint import LocalFile, RangeSource, header_of, header_tensors
from .resolve import Source, hub_errors

__all__ = ["RemoteFolder", "Verified", "prove_all"]

Verified = Literal["sha256", "size+header"]
_PART = 16 * 2**20  # bytes per range request
# A whole tensor of at most _SMALL bytes is fetched with the small tensors after it in the file, of the same
# decoder layer, up to _RUN bytes in one request: the merge reads a layer's tensors one after the other, and
# a request per norm or bias is a round trip each (hundreds per pass over a model).
_SMALL = 2**20
_RUN = 4 * 2**20
_LAYER = re.compile(r"^(.*?\blayers\.\d+\.)")
_ATTEMPTS = 3  # a part whose answer came back short is asked for again this many times in all


class RemoteFolder:
    """A Hub source's weight files at its resolved commit, opened as `RangeSource`s (a `checkpoint.Opener`).

    `on_bytes` is called with the number of bytes fetched from the network (for progress and measures).
    `verify`: prove every byte read against the files' LFS sha256 (`prove_all` must then be called once the
    merge has read everything); without it only sizes and headers are checked.
    """

    def __init__(
        self, source: Source, on_bytes: Callable[[int], None] | None = None, verify: bool = True
    ) -> None:
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
        self._verify = verify
        self._checks: dict[str, _FileCheck] = {}  # file -> what was read of it, while `verify`

    def _raw(self, file: str) -> RangeSource:
        """The file from the local cache when it is there, else from the Hub by range."""
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(self.repo_id, file, revision=self.sha)
        if isinstance(cached, str):
            return LocalFile(Path(cached))
        return _HubFile(self, file, self.source.files.get(file, 0))

    def open(self, file: str) -> tuple[RangeSource, int]:
        size = self.source.files.get(file, 0)
        lfs = self.source.lfs_sha256.get(file)
        check = None
        if self._verify and lfs is not None:
            check = self._checks.setdefault(file, _FileCheck(self, file, lfs))
        raw = self._raw(file)
        handle: RangeSource = _Checked(raw, check)
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
        if isinstance(raw, _HubFile):
            raw.group_reads({(start + t.offsets[0], start + t.offsets[1]): n for n, t in found.items()})
        self._open.append(handle)
        return handle, start

    def unproven(self) -> list[str]:
        """The files read so far whose bytes `prove` has not checked yet."""
        return [file for file, check in self._checks.items() if not check.done]

    def prove(self, file: str) -> None:
        """Prove what the merge read of `file` (see `_FileCheck`): read once more, in file order, what did
        not arrive in order, and check it; raises `SourceError` naming the file on any difference."""
        source = self._raw(file)
        try:
            self._checks[file].finish(source)
        finally:
            source.close()
        self.verified[file] = "sha256"

    def verification(self) -> Verified:
        """How the weight files were verified: sha256 when every one was proven by `prove`, else size+header."""
        files = {t.file for t in self.source.tensors.values()}
        return "sha256" if all(self.verified.get(f) == "sha256" for f in files) else "size+header"

    def count(self, n: int) -> None:
        with self._lock:
            self.fetched += n
        if self.on_bytes is not None:
            self.on_bytes(n)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def prove_all(folders: Iterable[RemoteFolder], workers: int = 4) -> None:
    """Prove every file the merge read from `folders` (`RemoteFolder.prove`), a few files at a time: each is
    a sequential read whose hashing releases the GIL, so files overlap their network waits and hashing."""
    jobs = [(folder, file) for folder in folders for file in folder.unproven()]
    if not jobs:
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(jobs)), thread_name_prefix="hubmerge-prove") as pool:
        for _ in pool.map(lambda job: job[0].prove(job[1]), jobs):
            pass


class _HubFile:
    """One Hub file read by range through `HfFileSystem`; one range fetched ahead on the folder's pool."""

    def __init__(self, folder: RemoteFolder, file: str, size: int) -> None:
        self.folder = folder
        self.file = file
        self.size = size
        self.name = f"{folder.repo_id}@{folder.sha[:12]}/{file}"
        self._lock = threading.Lock()
        self._ahead: tuple[int, int, Future[bytes]] | None = None
        # Tensor start -> (end, its layer's prefix, or its name outside the layers) (`group_reads`); a run of
        # small tensors fetched at once, (offset, bytes), until the reads have taken it or moved past it.
        self._tensors: dict[int, tuple[int, str]] = {}
        self._run: tuple[int, bytes] | None = None
        with self._errors():
            self._handle: Any = folder.fs.open(
                f"{folder.repo_id}/{file}",
                "rb",
                revision=folder.sha,
                block_size=_PART,
                cache_type="none",  # we fetch what the engine asks for (or a run of it), and one range ahead
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

    def group_reads(self, tensors: dict[tuple[int, int], str]) -> None:
        """The file's tensors, by absolute (start, end): small ones of one layer are fetched as one run."""
        for (start, end), name in tensors.items():
            if end > start:  # an empty tensor is no read
                layer = _LAYER.match(name)
                self._tensors[start] = (end, layer.group(1) if layer else name)

    def _run_end(self, offset: int, n: int) -> int:
        """Where the request for the read [offset, offset + n) ends: past it when the read is a whole small
        tensor followed in the file by small tensors of the same layer (contiguous, as safetensors writes)."""
        tensor = self._tensors.get(offset)
        if tensor is None or tensor[0] != offset + n or n > _SMALL:
            return offset + n
        end, group = offset + n, tensor[1]
        while (after := self._tensors.get(end)) is not None and after[1] == group:
            if after[0] - end > _SMALL or after[0] - offset > _RUN:
                break
            end = after[0]
        return end

    def readinto(self, offset: int, view: memoryview) -> None:
        n = len(view)
        run = self._run
        if run is not None and run[0] <= offset and offset + n <= run[0] + len(run[1]):
            at = offset - run[0]
            view[:] = run[1][at : at + n]
            if at + n == len(run[1]):
                self._run = None  # taken to its end
            return
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (offset, n):
            data = ahead[2].result()
        else:
            if ahead is not None:
                ahead[2].cancel()
            self._run = None  # a read outside the run: the merge, layer by layer, has moved past it
            end = self._run_end(offset, n)
            data = self._fetch(offset, end - offset)
            self._run = (offset, data) if end > offset + n else None
        view[:] = memoryview(data)[:n]

    def prefetch(self, offset: int, n: int) -> None:
        if self._ahead is None:
            self._ahead = (offset, n, self.folder.pool.submit(self._fetch, offset, n))

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead[2].cancel()
            self._ahead = None
        self._handle.close()


class _FileCheck:
    """What the merge read of one streamed file, checked against the file's LFS sha256.

    sha256 only hashes bytes in file order, and the engine reads tensors in layer order, which a safetensors
    file (names sorted as text: `layers.10` before `layers.2`) does not follow. So every read is recorded by
    its own sha256 (two reads of the same range must agree), and the file's bytes are hashed as one stream in
    file order: fed by the reads that arrive at its end, then, in `finish`, by reading the rest of the file
    once more. A recorded read is checked against the stream when the stream passes over it; the stream's
    digest must equal the Hub's. Every byte the merge used is then proven to be the Hub's; the price is a
    second read of the part that did not arrive in order (all of it when a read landed behind the stream
    with another range than the one that fed it, as a selection's samples may: the stream then starts again).

    Called from the engine's read threads (`record`), then from one prove thread (`finish`).
    """

    def __init__(self, folder: RemoteFolder, file: str, expected: str) -> None:
        self.folder = folder
        self.file = file
        self.expected = expected
        self.name = f"{folder.repo_id}@{folder.sha[:12]}/{file}"
        self._lock = threading.Lock()
        self._reads: dict[tuple[int, int], bytes] = {}  # (offset, length) -> sha256 of the bytes read
        self._behind = False  # a read landed inside the streamed part with another range: stream again
        self._restart()
        self.done = False

    def _restart(self) -> None:
        self._digest = hashlib.sha256()
        self._cursor = 0  # bytes [0, cursor) are in `_digest`
        self._waiting: list[tuple[int, int]] = sorted(self._reads)  # reads ahead of the stream
        self._active: list[tuple[int, int, Any]] = []  # reads the stream is passing over, with their sha256

    def record(self, offset: int, view: memoryview) -> None:
        key = (offset, len(view))
        digest = hashlib.sha256(view).digest()
        with self._lock:
            seen = self._reads.get(key)
            if seen is not None and seen != digest:
                raise self._changed(*key)
            self._reads[key] = digest
            if offset == self._cursor:
                self._stream(view)  # the read itself is proven with the stream: nothing to wait for
            elif seen is None and offset > self._cursor:
                bisect.insort(self._waiting, key)
            elif seen is None:
                self._behind = True

    def _stream(self, view: memoryview) -> None:
        """Hash `view`, the file's bytes at the cursor, and check the recorded reads it covers."""
        start, end = self._cursor, self._cursor + len(view)
        self._digest.update(view)
        taken = bisect.bisect_left(self._waiting, (end, 0))
        self._active += [(o, n, hashlib.sha256()) for o, n in self._waiting[:taken]]
        del self._waiting[:taken]
        still = []
        for offset, length, running in self._active:
            running.update(view[max(offset, start) - start : min(offset + length, end) - start])
            if offset + length > end:
                still.append((offset, length, running))
            elif running.digest() != self._reads[(offset, length)]:
                raise self._changed(offset, length)
        self._active = still
        self._cursor = end

    def finish(self, source: RangeSource) -> int:
        """Stream the rest of the file from `source` (a fresh handle on it), check it; returns the bytes
        read. Raises `SourceError` naming the file on any difference."""
        with self._lock:
            if self._behind:
                self._restart()
            start = self._cursor
            buffer = bytearray(min(_PART, max(source.size - start, 0)))
            for part in range(start, source.size, _PART):
                n = min(_PART, source.size - part)
                view = memoryview(buffer)[:n]
                source.readinto(part, view)
                if part + n < source.size:
                    source.prefetch(part + n, min(_PART, source.size - part - n))
                self._stream(view)
            if self._digest.hexdigest() != self.expected:
                raise SourceError(
                    f"{self.folder.source.label}: {self.name}: its sha256 is {self._digest.hexdigest()} but the "
                    f"Hub lists {self.expected}; the bytes were damaged on the way or on the Hub; run again, and "
                    "report it to the repo's owners if it persists"
                )
            self.done = True
            return source.size - start

    def _changed(self, offset: int, n: int) -> SourceError:
        return SourceError(
            f"{self.folder.source.label}: {self.name}: bytes {offset}-{offset + n - 1} differ between two reads "
            f"of the same commit, so the Hub or the network changed them; run again, and report it to the "
            "repo's owners if it persists"
        )


class _Checked:
    """A `RangeSource` whose every read is recorded by the file's `_FileCheck`."""

    def __init__(self, inner: RangeSource, check: _FileCheck | None) -> None:
        self.inner = inner
        self.check = check
        self.name = inner.name
        self.size = inner.size

    def readinto(self, offset: int, view: memoryview) -> None:
        self.inner.readinto(offset, view)
        if self.check is not None:
            self.check.record(offset, view)

    def prefetch(self, offset: int, n: int) -> None:
        self.inner.prefetch(offset, n)

    def close(self) -> None:
        self.inner.close()
