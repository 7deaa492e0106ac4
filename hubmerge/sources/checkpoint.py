"""Reading and writing safetensors checkpoints a tensor (or a slice of rows) at a time.

We parse the safetensors header ourselves and read with `pread` into buffers we own instead of using
`safe_open`: `safe_open` memory-maps whole files, and every page a merge touches then counts towards the
process's resident memory, so a 4 × 3 GB merge would report (and, under pressure, hold) gigabytes of
mapped pages. Writing is streamed too: output shapes are known from the plan, so each shard's header is
written first and tensor bytes follow in order, without buffering a shard in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union

import torch

from ..errors import SourceError
from ..publish.files import INDEX_FILE, SINGLE_FILE

__all__ = [
    "DTYPES",
    "PICKLE_SUFFIXES",
    "Folder",
    "LocalFile",
    "Opener",
    "RangeSource",
    "ShardWriter",
    "TensorInfo",
    "TensorReader",
    "index_folder",
    "numel",
    "read_header",
    "select_weights",
    "weight_files",
]

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}
SAFETENSORS_NAME = {v: k for k, v in DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit
# Bytes per element of every dtype the safetensors format knows (its `Dtype` enum).
_DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: `offsets` are relative to the data section of `file`."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    file: str  # relative to the checkpoint folder
    offsets: tuple[int, int]

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


class RangeSource(Protocol):
    """A file read by absolute byte ranges: a local file, or a Hub file read by HTTP range (remote.py)."""

    @property
    def name(self) -> str: ...  # the path or URL, for messages

    @property
    def size(self) -> int: ...

    def readinto(self, offset: int, view: memoryview) -> None:
        """Fill `view` with the bytes at `offset`, or raise `SourceError`."""

    def prefetch(self, offset: int, n: int) -> None:
        """A hint: the bytes at [offset, offset + n) are read next."""

    def close(self) -> None: ...


class Opener(Protocol):
    """A checkpoint folder that is not a local path: `open` gives a file's source and where its data starts."""

    def open(self, file: str) -> tuple[RangeSource, int]: ...


Folder = Union[Path, Opener]  # noqa: UP007 - a runtime alias, and Python 3.10 has no `|` on a Protocol


class LocalFile:
    """A local file as a `RangeSource`, read with `pread` into buffers we own."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size

    def readinto(self, offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise SourceError(f"{self.name} is truncated at byte {offset + done}; re-download it")
            done += n

    def prefetch(self, offset: int, n: int) -> None:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, offset, n, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        os.close(self._fd)


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header dict of a safetensors file and the absolute offset where its data starts."""
    source = LocalFile(path)
    try:
        return header_of(source, "re-download it")
    finally:
        source.close()


def header_of(source: RangeSource, fix: str) -> tuple[dict[str, Any], int]:
    """The header dict of a safetensors file read from `source`, and where its data starts; `fix` ends
    every error message (what the user should do)."""
    if source.size < 8:
        raise SourceError(f"{source.name} is not a safetensors file (shorter than 8 bytes); {fix}")
    raw = bytearray(8)
    source.readinto(0, memoryview(raw))
    (length,) = struct.unpack("<Q", raw)
    if length > min(_MAX_HEADER, source.size - 8):
        raise SourceError(
            f"{source.name} is not a safetensors file or is truncated (header of {length} bytes in a file of "
            f"{source.size}); {fix}"
        )
    text = bytearray(length)
    source.readinto(8, memoryview(text))
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python recurses
        header = None
    if not isinstance(header, dict):
        raise SourceError(f"{source.name} has a corrupt safetensors header; {fix}")
    return header, 8 + length


def _corrupt(where: str, name: str, problem: str) -> SourceError:
    return SourceError(f"{where}: tensor {name}: {problem}; the file is corrupt or truncated, re-download it")


def header_tensors(
    header: Mapping[str, Any], file: str, where: str, data_size: int, exact: bool = True
) -> dict[str, TensorInfo]:
    """The tensors a header describes, checked as the safetensors library checks them.

    Each dtype is known, byte size = shape × dtype size, and the data sections follow each other from 0
    without gap or overlap up to `data_size` (exactly, or at most when `exact` is False: the Hub gives
    the file size but not the header's). `where` names the file in messages.
    """
    tensors: dict[str, TensorInfo] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(spec, dict):
            raise _corrupt(where, name, "its header entry is not a table")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPE_SIZES:
            raise _corrupt(where, name, f"unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _corrupt(where, name, f"invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _corrupt(where, name, f"invalid data_offsets {offsets!r}")
        if offsets[1] - offsets[0] != numel(tuple(shape)) * _DTYPE_SIZES[dtype]:
            raise _corrupt(
                where,
                name,
                f"{offsets[1] - offsets[0]} bytes for shape {shape} of {dtype} "
                f"({numel(tuple(shape)) * _DTYPE_SIZES[dtype]} expected)",
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), file, (offsets[0], offsets[1]))
    end = 0
    for info in sorted(tensors.values(), key=lambda t: t.offsets):
        if info.offsets[0] != end:
            problem = "overlaps the previous tensor" if info.offsets[0] < end else "leaves a gap before it"
            raise _corrupt(where, info.name, f"data_offsets {list(info.offsets)} {problem}")
        end = info.offsets[1]
    if end > data_size or (exact and end != data_size):
        last = max(tensors.values(), key=lambda t: t.offsets).name if tensors else "(none)"
        raise _corrupt(where, last, f"the data ends at byte {end} but the file holds {data_size}")
    return tensors


def select_weights(names: Iterable[str], where: str) -> str:
    """Which file says where the weights are, chosen as transformers chooses: `model.safetensors`, else the
    index. Raises `SourceError` naming what was found instead (pickles are never loaded)."""
    names = set(names)
    if SINGLE_FILE in names:
        return SINGLE_FILE
    if INDEX_FILE in names:
        return INDEX_FILE
    safetensors, pickles = weight_files(names)
    if safetensors:
        raise SourceError(
            f"{where}: {', '.join(safetensors[:3])} but no {SINGLE_FILE} or {INDEX_FILE}; transformers would not "
            f"load these weights either: rename a single file to {SINGLE_FILE} or add the index"
        )
    if pickles:
        raise SourceError(
            f"{where} has only pickle weights ({pickles[0]}); hubmerge never loads pickle files because "
            "they can run code. Convert them to safetensors (transformers: save_pretrained(safe_serialization=True))"
        )
    raise SourceError(f"{where}: no *.safetensors weights")


def add_tensors(tensors: dict[str, TensorInfo], found: Mapping[str, TensorInfo], where: str) -> None:
    """Merge one file's tensors into a checkpoint's; a name stored in two files is ambiguous."""
    for name, info in found.items():
        if name in tensors:
            raise SourceError(
                f"{where}: tensor {name} is stored in both {tensors[name].file} and {info.file}; the checkpoint "
                "is inconsistent, re-download it"
            )
        tensors[name] = info


def weight_files(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split a listing into safetensors weight files and pickle weight files."""
    names = list(names)
    safetensors = sorted(n for n in names if n.endswith(".safetensors") and "/" not in n)
    pickles = sorted(
        n for n in names if n.endswith(PICKLE_SUFFIXES) and "/" not in n and not n.startswith("training_args")
    )
    return safetensors, pickles


def index_folder(folder: Path, label: str) -> dict[str, TensorInfo]:
    """Every tensor of a local checkpoint folder, single-file or sharded."""
    if not folder.is_dir():
        raise SourceError(f"{label}: no such folder {folder}")
    names = [p.name for p in folder.iterdir()]
    files = [SINGLE_FILE]
    if select_weights(names, f"{label} ({folder})") == INDEX_FILE:
        files = index_files(folder / INDEX_FILE, label)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        path = folder / file
        if not path.is_file():
            raise SourceError(f"{label}: {INDEX_FILE} lists {file}, which is missing from {folder}")
        header, start = read_header(path)
        add_tensors(tensors, header_tensors(header, file, str(path), path.stat().st_size - start), label)
    return tensors


def index_files(path: Path, label: str) -> list[str]:
    """The shard files a `model.safetensors.index.json` lists, each a plain file name in its folder."""
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise SourceError(f"{label}: {path} is not a valid safetensors index; re-download it") from None
    if not all(isinstance(f, str) and f.endswith(".safetensors") and f == Path(f).name for f in files):
        raise SourceError(
            f"{label}: {path} lists shard names that are not files of its folder; re-download it"
        )
    return files


class TensorReader:
    """Reads tensors, or ranges of their leading dimension, from one checkpoint folder (local or not)."""

    def __init__(self, folder: Folder) -> None:
        self.folder = folder
        self._files: dict[str, tuple[RangeSource, int]] = {}  # file -> (source, data start)

    def _open(self, file: str) -> tuple[RangeSource, int]:
        if file not in self._files:
            if isinstance(self.folder, Path):
                source = LocalFile(self.folder / file)
                self._files[file] = (source, header_of(source, "re-download it")[1])
            else:
                self._files[file] = self.folder.open(file)
        return self._files[file]

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor (or rows [a, b) of it) in its stored dtype, in memory we own."""
        source, start = self._open(info.file)
        row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else info.nbytes
        a, b = rows if rows is not None else (0, info.shape[0] if info.shape else 1)
        first, count = start + info.offsets[0] + a * row_bytes, (b - a) * row_bytes
        buffer = torch.empty(count, dtype=torch.uint8)
        if count:
            source.readinto(first, memoryview(buffer.numpy()))  # type: ignore[arg-type]
        end = start + info.offsets[1]
        if first + count < end:  # the engine reads a tensor's slices in order: the next one follows
            source.prefetch(first + count, min(count, end - first - count))
        shape = ((b - a), *info.shape[1:]) if info.shape else ()
        return buffer.view(DTYPES[info.dtype]).reshape(shape)

    def close(self) -> None:
        for source, _ in self._files.values():
            source.close()
        self._files.clear()


@dataclass(frozen=True)
class ShardLayout:
    """One output file: its tensors in data order, with their shapes and dtype."""

    file: str
    tensors: tuple[tuple[str, tuple[int, ...]], ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        item = torch.empty(0, dtype=self.dtype).element_size()
        return sum(numel(shape) * item for _, shape in self.tensors)


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class ShardWriter:
    """Writes one safetensors file whose header is known up front; data arrives in order, in pieces."""

    def __init__(self, path: Path, layout: ShardLayout, metadata: Mapping[str, str]) -> None:
        item = torch.empty(0, dtype=layout.dtype).element_size()
        header: dict[str, Any] = {"__metadata__": dict(metadata)}
        offset = 0
        self.offsets: dict[str, int] = {}
        for name, shape in layout.tensors:
            size = numel(shape) * item
            header[name] = {
                "dtype": SAFETENSORS_NAME[layout.dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self.offsets[name] = offset
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data stays 8-byte aligned, as the safetensors library writes it
        self.data_start = 8 + len(raw)
        self.size = offset
        self.path = path
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        # Hashed as written, so the lock file costs no second read of gigabytes.
        self.digest = hashlib.sha256(struct.pack("<Q", len(raw)) + raw)
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._written = 0
        # Writing and hashing happen on a thread (both release the GIL), one piece in flight, so they
        # overlap the computation of the next piece without holding more than one extra slice.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hubmerge-write")
        self._pending: Future[None] | None = None

    def _write(self, view: memoryview) -> None:
        self._file.write(view)
        self.digest.update(view)

    def write(self, data: torch.Tensor) -> None:
        view = memoryview(data.contiguous().reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
        if self._pending is not None:
            self._pending.result()
        self._pending = self._pool.submit(self._write, view)
        self._written += len(view)

    def close(self, complete: bool = True) -> None:
        """Finish the file; `complete=False` when the merge stopped early and the file will be discarded."""
        try:
            if self._pending is not None:
                self._pending.result()
        finally:
            self._pool.shutdown(wait=True)
            self._file.close()
        if complete and self._written != self.size:
            raise RuntimeError(f"{self.path}: wrote {self._written} of {self.size} bytes")  # an engine bug
