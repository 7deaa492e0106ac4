"""What the local Hub stores: blobs (in memory, sparse or on disk), git and LFS object ids, and the
records of repos, commits, pull requests and users."""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# The Hub stores these in LFS: the default `.gitattributes` patterns for weights, and anything large.
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")
LFS_MIN_SIZE = 10 * 1024 * 1024

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,96}")
_SHA_RE = re.compile(r"[0-9a-f]{40}")
_SHA_PREFIX_RE = re.compile(r"[0-9a-f]{7,39}")
_PR_REF_RE = re.compile(r"refs/pr/([1-9][0-9]*)")
_FRONT_MATTER_RE = re.compile(r"\A\s*---[\r\n]+(.*?)[\r\n]+---(?:\r?\n|\Z)", re.DOTALL)
_INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
_REPO_NAME_RULES = (
    "only regular characters and '-', '_', '.' are accepted. '--' and '..' are forbidden. '-' and '.' cannot "
    'start or end the name. The name cannot end with ".git". Max length is 96.'
)

_GITATTRIBUTES = b"".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n".encode()
    for pattern in ("*.bin", "*.safetensors", "*.pt", "*.pth", "*.gguf", "*.onnx", "*tfevents*")
)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob, which the Hub reports as `oid`/`blobId` and `ETag`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that stands in the git tree for an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def is_lfs(path: str, size: int) -> bool:
    """Whether the Hub would keep this file in LFS. Empty files never are: the client uploads them inline."""
    return size > 0 and (path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE)


def _iso(timestamp: float) -> str:
    millis = int(timestamp * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{millis:03d}Z"


class SparseFile:
    """File content of which only a prefix is stored: the rest reads as zeros. It stands for a checkpoint
    shard of real size whose header alone matters (a plan reads only headers), so a 145 GB model fits in
    memory. Only ranges can be read from the server; its `sha256` is made up, and stable."""

    def __init__(self, prefix: bytes, size: int) -> None:
        if size < len(prefix):
            raise ValueError("a sparse file is at least as long as its stored prefix")
        self.prefix = prefix
        self.size = size
        self.sha256 = hashlib.sha256(prefix + b"sparse %d" % size).hexdigest()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, span: slice) -> bytes:
        start, stop, _ = span.indices(self.size)
        part = self.prefix[start:stop]
        return part + bytes(max(0, stop - start - len(part)))


class DiskFile:
    """File content read from a file on disk when served, so that a benchmark can serve checkpoints of many
    GB (bench/streaming.py) without holding them in memory. `sha256` is the file's real one (computed once,
    or given when known); whole GETs and ranges both work."""

    def __init__(self, path: Path, sha256: str | None = None) -> None:
        self.path = path
        self.size = path.stat().st_size
        if sha256 is None:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
            sha256 = digest.hexdigest()
        self.sha256 = sha256

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, span: slice) -> bytes:
        start, stop, _ = span.indices(self.size)
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), max(0, stop - start), start)

    def chunks(self, size: int = 1 << 24) -> Iterator[bytes]:
        """The whole content in pieces of `size` bytes, for writing a response without loading it."""
        with open(self.path, "rb") as f:
            while block := f.read(size):
                yield block


@dataclass(frozen=True)
class HubCommit:
    """A commit. `files` maps each path to the sha256 of its content (the key of the blob store)."""

    sha: str
    parent: str | None
    summary: str
    description: str
    author: str
    created_at: float
    files: Mapping[str, str]


@dataclass
class PullRequest:
    """A discussion; pull requests own the ref `refs/pr/{num}`, which points at their head commit."""

    num: int
    title: str
    description: str
    author: str
    created_at: float
    is_pull_request: bool
    base_branch: str = "main"
    status: str = "open"

    @property
    def ref(self) -> str:
        return f"refs/pr/{self.num}"


@dataclass
class _Repo:
    repo_id: str
    private: bool
    gated: bool
    created_at: float
    commits: dict[str, HubCommit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pr_refs: dict[int, str] = field(default_factory=dict)
    discussions: dict[int, PullRequest] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


@dataclass(frozen=True)
class _User:
    name: str
    orgs: tuple[str, ...]
    # A fine-grained token's permissions: entity (a namespace, or a repo id) -> permissions such as
    # "repo.write". None for a classic write token.
    scoped: Mapping[str, tuple[str, ...]] | None = None
