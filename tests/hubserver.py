"""A small in-memory Hugging Face Hub for the test suite.

`LocalHub` serves the subset of the Hub's HTTP API that `huggingface_hub` 2.4 uses for model repos, so the
real client can run against it through `HF_ENDPOINT=http://127.0.0.1:PORT`. It is stdlib only and keeps
everything in memory.

What it implements:

* users and Bearer tokens (`/api/whoami-v2`), organisations as extra writable namespaces, and fine-grained
  tokens whose `repo.write` permission is scoped to namespaces or repos (enforced on writes);
* model repos with git-like history: branches, tags, pull-request refs (`refs/pr/N`), commits whose files
  are content-addressed blobs; a new repo starts with one commit holding `.gitattributes`, as on the Hub;
* reads: repo info (`?blobs=true` siblings, `cardData` from the README front matter when PyYAML is
  importable), tree listings with real git blob sha1 oids and LFS sha256 oids, commit and ref listings,
  `HEAD`/`GET /resolve` with the metadata headers the client requires and single byte ranges (206);
* writes: repo creation, `validate-yaml`, preupload (upload modes and remote oids, so unchanged files are
  skipped by the client), the LFS batch API with a one-shot capability URL for the `PUT` and a verify
  URL, ndjson commits (regular files, LFS pointers, file and folder deletions, `parentCommit` checks,
  `create_pr=1`), branches and pull requests through the discussions API;
* the Hub's access rules as the client sees them: private repos are hidden behind 404 `RepoNotFound`,
  gated repos answer 401 `GatedRepo` to anonymous readers, and every error carries `X-Error-Code` /
  `X-Error-Message`, because on `http://` the client only maps errors from those headers;
* a request log (with the `Range` header of each request) and fault injection: error answers (`fail_next`),
  connections closed before the answer (`drop_next`) or halfway through its body (`cut_next`), and requests
  held until the test releases them (`hold_next`).

What it deliberately does not implement:

* Xet. The server never sends `X-Xet-Hash` or tree `xetHash`, so downloads stay plain HTTP. Uploads of LFS
  files go to Xet whenever `hf_xet` is importable, and no server answer can prevent that: clients must run
  with `HF_HUB_DISABLE_XET=1`, which makes them use the LFS "basic" transfer served here.
* Datasets, Spaces, repo ids without a namespace, paths-info, file copies, LFS multipart uploads, LFS
  downloads through the batch API, pagination (every listing fits in one page), repo settings, and commits
  opened as pull requests by users without write access to the namespace (the Hub allows those).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import secrets
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote

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


class HubError(Exception):
    """An HTTP error answer, with the `X-Error-Code` the client maps to an exception class."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


class RequestRecord(NamedTuple):
    """One served request: `path` is percent-decoded without the query, `range` is the Range header."""

    method: str
    path: str
    status: int
    body_bytes: int
    range: str | None


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


@dataclass
class _Fault:
    remaining: int
    status: int | None  # None: close the connection without answering
    path_contains: str | None
    method: str | None
    cut: bool = False  # answer normally but close the connection halfway through the body
    whole: bool = False  # only requests without a Range header (a download, not a header probe)
    from_byte: int | None = None  # only requests for a range starting at this byte or later


@dataclass
class Hold:
    """A request held before it is answered: `arrived` is set when it comes in, and the answer waits
    for `release`, so a test can act while a client is provably mid-request (a slow Hub, as seen by it)."""

    path_contains: str
    method: str | None
    whole: bool  # only requests without a Range header (a download, not a header probe)
    from_byte: int | None = None  # only requests for a range starting at this byte or later
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Request:
    method: str
    target: str  # raw request target, query included
    path: str  # percent-decoded, no query
    segments: list[str]  # split on "/" first, then percent-decoded, so "refs%2Fpr%2F1" stays one segment
    query: dict[str, list[str]]
    headers: Message  # case-insensitive lookups
    body: bytes

    def flag(self, name: str) -> bool:
        return self.query.get(name, [""])[-1].lower() in ("1", "true")

    def json(self) -> dict[str, Any]:
        if not self.body.strip():
            return {}
        try:
            payload = json.loads(self.body)
        except ValueError as err:
            raise HubError(400, f"Malformed JSON body: {err}") from err
        if not isinstance(payload, dict):
            raise HubError(400, "The JSON body must be an object")
        return payload


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    cut: bool = False  # send half the body, then drop the connection


def _json_response(payload: Any, status: int = 200, content_type: str = "application/json") -> _Response:
    # default=str: YAML front matter may hold dates, which json cannot encode natively.
    body = json.dumps(payload, default=str).encode()
    return _Response(status, body, {"Content-Type": f"{content_type}; charset=utf-8"})


class LocalHub:
    """An in-memory Hub served on 127.0.0.1; see the module docstring for its scope."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._users: dict[str, _User] = {}
        self._tokens: dict[str, str] = {}  # token -> user name
        self._scopes: dict[str, Mapping[str, tuple[str, ...]]] = {}  # fine-grained token -> its permissions
        self._repos: dict[str, _Repo] = {}
        self._blobs: dict[str, bytes] = {}  # sha256 -> content, shared by all repos like the Hub's LFS store
        # sha256 -> git blob sha1, cached because hashing large blobs on every HEAD is slow.
        self._git_sha1: dict[str, str] = {}
        self._pending_uploads: dict[str, tuple[str, int]] = {}  # capability -> (sha256, size)
        self._faults: list[_Fault] = []
        self._holds: list[Hold] = []
        # (repo id, path) -> what a byte-range answer carries instead of the stored bytes (`tamper`).
        self._tampers: dict[tuple[str, str], Callable[[int, int, bytes], bytes]] = {}
        self._commit_counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.requests: list[RequestRecord] = []
        # Tracebacks of unexpected exceptions in route handlers; tests assert it stays empty.
        self.server_errors: list[str] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalHub:
        if self._server is not None:
            raise RuntimeError("LocalHub is already running")
        server = _HubHTTPServer(("127.0.0.1", 0), _Handler)
        server.hub = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="LocalHub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # ------------------------------------------------------------------ seeding helpers (no HTTP)

    def add_user(self, name: str, token: str, orgs: Iterable[str] = ()) -> None:
        """Register a user (or another token for an existing one); `orgs` are namespaces it may write to."""
        with self._lock:
            self._users[name] = _User(name, tuple(orgs))
            self._tokens[token] = name

    def add_fine_grained_token(self, name: str, token: str, scoped: Mapping[str, Iterable[str]]) -> None:
        """Give the existing user `name` a fine-grained token: `scoped` maps an entity (the user, one of its
        orgs, or a repo id) to permissions such as "repo.content.read" and "repo.write"."""
        with self._lock:
            if name not in self._users:
                raise KeyError(f"no user {name!r}")
            self._tokens[token] = name
            self._scopes[token] = {entity: tuple(perms) for entity, perms in scoped.items()}

    def create_repo(self, repo_id: str, private: bool = False, gated: bool = False) -> str:
        """Create a model repo whose `main` holds one `.gitattributes` commit; returns that commit's sha."""
        namespace, name = self._split_repo_id(repo_id)
        if not (_valid_repo_name(namespace) and _valid_repo_name(name)):
            raise ValueError(f"{repo_id!r}: {_REPO_NAME_RULES}")
        with self._lock:
            if repo_id in self._repos:
                raise ValueError(f"{repo_id} already exists")
            return self._create_repo(repo_id, private=private, gated=gated, author=namespace)

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        message: str,
        branch: str = "main",
        delete: Iterable[str] = (),
    ) -> str:
        """Commit `files` (added or replaced) and `delete` (file paths) onto `branch`; returns the sha."""
        with self._lock:
            repo = self._repo(repo_id)
            if branch not in repo.branches:
                raise KeyError(f"{repo_id} has no branch {branch!r}")
            tip = repo.commits[repo.branches[branch]]
            snapshot = dict(tip.files)
            for path in delete:
                del snapshot[path]
            for path, content in files.items():
                snapshot[path] = self._store_blob(content)
            sha = self._new_commit(repo, tip.sha, snapshot, message, "", repo.namespace)
            repo.branches[branch] = sha
            return sha

    def create_branch(self, repo_id: str, name: str, from_rev: str = "main") -> str:
        """Create branch `name` at `from_rev`; returns the sha it points to."""
        with self._lock:
            repo = self._repo(repo_id)
            if name in repo.branches:
                raise ValueError(f"{repo_id} already has a branch {name!r}")
            sha = self._resolve_or_raise(repo, from_rev)
            repo.branches[name] = sha
            return sha

    def create_tag(self, repo_id: str, tag: str, rev: str = "main") -> str:
        """Tag `rev` as `tag`; returns the tagged sha."""
        with self._lock:
            repo = self._repo(repo_id)
            if tag in repo.tags:
                raise ValueError(f"{repo_id} already has a tag {tag!r}")
            sha = self._resolve_or_raise(repo, rev)
            repo.tags[tag] = sha
            return sha

    def head(self, repo_id: str, rev: str = "main") -> str:
        """The commit sha that `rev` (branch, tag, `refs/pr/N` or sha) resolves to."""
        with self._lock:
            return self._resolve_or_raise(self._repo(repo_id), rev)

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """Every file of the repo at `rev`, with its content."""
        with self._lock:
            repo = self._repo(repo_id)
            commit = repo.commits[self._resolve_or_raise(repo, rev)]
            return {path: self._blobs[key] for path, key in commit.files.items()}

    def commits(self, repo_id: str, branch: str = "main") -> list[HubCommit]:
        """The history reachable from `branch` (any revision works), newest first."""
        with self._lock:
            repo = self._repo(repo_id)
            return self._history(repo, self._resolve_or_raise(repo, branch))

    def pull_requests(self, repo_id: str) -> list[PullRequest]:
        """The repo's pull requests (not plain discussions), oldest first."""
        with self._lock:
            repo = self._repo(repo_id)
            return [replace(d) for _, d in sorted(repo.discussions.items()) if d.is_pull_request]

    # ------------------------------------------------------------------ request log and faults

    def bytes_served(
        self, match: Callable[[str], bool], *, include_ranges: bool = True, since: int = 0
    ) -> int:
        """Body bytes sent by GETs whose decoded path satisfies `match`, from `requests[since]` on.

        With `include_ranges=False`, requests that carried a `Range` header are left out, so a test can allow
        safetensors header probes while asserting that no whole file was downloaded.
        """
        with self._lock:
            return sum(
                record.body_bytes
                for record in self.requests[since:]
                if record.method == "GET" and match(record.path) and (include_ranges or record.range is None)
            )

    def fail_next(
        self,
        n: int,
        status: int = 500,
        path_contains: str | None = None,
        method: str | None = None,
        from_byte: int | None = None,
    ) -> None:
        """Answer `status` to the next `n` requests whose target (raw or decoded) contains `path_contains`.

        None matches any target; `method` (e.g. "GET") narrows the match, since a download is a HEAD then a
        GET on the same path and the client retries them differently. With `from_byte`, only requests for a
        range starting at that byte or later match (a read of tensor data, not of a header).
        """
        with self._lock:
            self._faults.append(_Fault(n, status, path_contains, method, from_byte=from_byte))

    def drop_next(
        self,
        n: int,
        path_contains: str | None = None,
        method: str | None = None,
        from_byte: int | None = None,
    ) -> None:
        """Close the connection without an answer on the next `n` matching requests (see `fail_next`)."""
        with self._lock:
            self._faults.append(_Fault(n, None, path_contains, method, from_byte=from_byte))

    def cut_next(
        self,
        n: int,
        path_contains: str,
        method: str | None = None,
        whole: bool = False,
        from_byte: int | None = None,
    ) -> None:
        """Send the headers and half the body of the next `n` matching answers, then close the connection;
        with `whole`, only requests without a Range header match (`from_byte`: see `fail_next`)."""
        with self._lock:
            self._faults.append(
                _Fault(n, None, path_contains, method, cut=True, whole=whole, from_byte=from_byte)
            )

    def hold_next(
        self, path_contains: str, method: str | None = None, whole: bool = False, from_byte: int | None = None
    ) -> Hold:
        """Hold the next matching request until the returned `Hold` is released (see `Hold`); with `whole`,
        only a request without a Range header matches (`from_byte`: see `fail_next`)."""
        hold = Hold(path_contains, method, whole, from_byte)
        with self._lock:
            self._holds.append(hold)
        return hold

    def tamper(self, repo_id: str, path: str, answer: Callable[[int, int, bytes], bytes]) -> None:
        """Answer every byte-range GET of `path` in `repo_id` with `answer(start, end, content)` (end
        inclusive) instead of `content[start : end + 1]`, keeping the status, headers and length: a Hub whose
        ranges lie while its metadata (sizes, LFS sha256, whole downloads) stays right."""
        with self._lock:
            self._tampers[(repo_id, path)] = answer

    def _take_hold(
        self, method: str, target: str, ranged: bool, range_header: str | None = None
    ) -> Hold | None:
        with self._lock:
            for hold in self._holds:
                if (
                    hold.method in (None, method)
                    and not (hold.whole and ranged)
                    and (hold.from_byte is None or _range_start(range_header) >= hold.from_byte)
                    and (hold.path_contains in target or hold.path_contains in unquote(target))
                ):
                    self._holds.remove(hold)
                    return hold
        return None

    # ------------------------------------------------------------------ request entry point

    def _handle(self, method: str, target: str, headers: Message, body: bytes) -> _Response | None:
        """Answer one request; None means: close the connection without answering."""
        raw_path, _, query = target.partition("?")
        request = _Request(
            method=method,
            target=target,
            path=unquote(raw_path),
            segments=[unquote(s) for s in raw_path.split("/")[1:]],
            query=parse_qs(query, keep_blank_values=True),
            headers=headers,
            body=body,
        )
        with self._lock:
            fault = self._take_fault(request)
            if fault is not None and fault.status is None and not fault.cut:
                self._log(request, 0, 0)
                return None
            try:
                if fault is not None and fault.status is not None:
                    raise HubError(fault.status, f"Injected fault ({fault.status})")
                response = self._route(request)
            except HubError as err:
                response = self._error_response(request, err)
            except Exception:
                self.server_errors.append(traceback.format_exc())
                response = self._error_response(request, HubError(500, "Internal error in LocalHub"))
            if fault is not None and fault.cut:
                response.cut = True
            self._log(request, response.status, 0 if method == "HEAD" else len(response.body))
            return response

    def _take_fault(self, request: _Request) -> _Fault | None:
        for fault in self._faults:
            if fault.method is not None and fault.method != request.method:
                continue
            if fault.whole and request.headers.get("Range") is not None:
                continue
            if fault.from_byte is not None and _range_start(request.headers.get("Range")) < fault.from_byte:
                continue
            needle = fault.path_contains
            if needle is None or needle in request.target or needle in unquote(request.target):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _log(self, request: _Request, status: int, body_bytes: int) -> None:
        self.requests.append(
            RequestRecord(request.method, request.path, status, body_bytes, request.headers.get("Range"))
        )

    def _error_response(self, request: _Request, err: HubError) -> _Response:
        if request.method == "HEAD":
            response = _Response(err.status, b"", {})
        else:
            response = _json_response({"error": err.message}, err.status)
        response.headers["X-Error-Message"] = err.message
        if err.code is not None:
            response.headers["X-Error-Code"] = err.code
        response.headers.update(err.headers)
        return response

    def _route(self, req: _Request) -> _Response:
        seg, method = req.segments, req.method
        if seg[:1] == ["api"]:
            if seg == ["api", "whoami-v2"] and method == "GET":
                return self._whoami(req)
            if seg == ["api", "agent-harnesses"]:
                # The client fetches this registry to build its user-agent; a 404 is swallowed.
                raise HubError(404, "Not found")
            if seg == ["api", "repos", "create"] and method == "POST":
                return self._create_repo_route(req)
            if seg == ["api", "validate-yaml"] and method == "POST":
                return self._validate_yaml(req)
            if len(seg) >= 4 and seg[1] == "models":
                return self._model_api(req, f"{seg[2]}/{seg[3]}", seg[4:])
            if len(seg) == 3 and seg[1] == "models":
                raise HubError(404, "Repository not found", "RepoNotFound")
        elif seg[:1] == ["lfs-upload"] and len(seg) == 2 and method == "PUT":
            return self._lfs_put(req, seg[1])
        elif len(seg) >= 2 and seg[1].endswith(".git") and method == "POST":
            repo_id = f"{seg[0]}/{seg[1].removesuffix('.git')}"
            if seg[2:] == ["info", "lfs", "objects", "batch"]:
                return self._lfs_batch(req, repo_id)
            if seg[2:] == ["info", "lfs", "verify"]:
                return self._lfs_verify(req, repo_id)
        elif len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve_file(req, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        raise HubError(404, f"No route for {method} {req.path}")

    def _model_api(self, req: _Request, repo_id: str, rest: list[str]) -> _Response:
        method = req.method
        if method == "GET" and not rest:
            return self._model_info(req, repo_id, "main")
        if method == "GET" and len(rest) >= 2 and rest[0] == "revision":
            return self._model_info(req, repo_id, "/".join(rest[1:]))
        if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
            return self._tree(req, repo_id, rest[1], "/".join(rest[2:]))
        if method == "GET" and len(rest) == 2 and rest[0] == "commits":
            return self._list_commits(req, repo_id, rest[1])
        if method == "GET" and rest == ["refs"]:
            return self._refs(req, repo_id)
        if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
            return self._preupload(req, repo_id, rest[1])
        if method == "POST" and len(rest) == 2 and rest[0] == "commit":
            return self._commit_route(req, repo_id, rest[1])
        if method == "POST" and len(rest) == 2 and rest[0] == "branch":
            return self._create_branch_route(req, repo_id, rest[1])
        if method == "POST" and rest == ["discussions"]:
            return self._create_discussion(req, repo_id)
        if method == "GET" and len(rest) == 2 and rest[0] == "discussions":
            return self._discussion_details(req, repo_id, rest[1])
        raise HubError(404, f"No route for {method} {req.path}")

    # ------------------------------------------------------------------ auth

    def _optional_user(self, req: _Request) -> _User | None:
        """The user behind the Bearer token, if any; an unknown token is a 401 even where none is needed."""
        header = req.headers.get("Authorization", "")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        name = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if name is None:
            raise HubError(401, _INVALID_CREDENTIALS)
        return replace(self._users[name], scoped=self._scopes.get(token.strip()))

    def _required_user(self, req: _Request) -> _User:
        user = self._optional_user(req)
        if user is None:
            raise HubError(401, _INVALID_CREDENTIALS)
        return user

    def _readable_repo(self, req: _Request, repo_id: str) -> _Repo:
        user = self._optional_user(req)
        repo = self._repos.get(repo_id)
        # The Hub answers "not found" for private repos of others, so their existence does not leak.
        if repo is None or (repo.private and not _can_write(user, repo.namespace)):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if repo.gated and user is None:
            raise HubError(
                401,
                f"Access to model {repo_id} is restricted. You must be authenticated to access it. "
                f"Visit {self.url}/{repo_id} to ask for access.",
                "GatedRepo",
            )
        return repo

    def _writable_repo(self, req: _Request, repo_id: str) -> tuple[_Repo, _User]:
        user = self._required_user(req)
        repo = self._readable_repo(req, repo_id)
        if not _can_write(user, repo.namespace, repo_id):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo, user

    # ------------------------------------------------------------------ account and repo routes

    def _whoami(self, req: _Request) -> _Response:
        user = self._required_user(req)
        token: dict[str, Any] = {"displayName": "test-token", "role": "write"}
        if user.scoped is not None:
            token = {
                "displayName": "test-fine-grained-token",
                "role": "fineGrained",
                "fineGrained": {
                    "canReadGatedRepos": False,
                    "global": [],
                    "scoped": [
                        {
                            "entity": {
                                "_id": hashlib.sha1(entity.encode()).hexdigest()[:24],
                                "type": "model"
                                if "/" in entity
                                else "user"
                                if entity == user.name
                                else "org",
                                "name": entity,
                            },
                            "permissions": list(permissions),
                        }
                        for entity, permissions in user.scoped.items()
                    ],
                },
            }
        return _json_response(
            {
                "type": "user",
                "id": hashlib.sha1(user.name.encode()).hexdigest()[:24],
                "name": user.name,
                "fullname": user.name,
                "orgs": [{"type": "org", "name": org, "roleInOrg": "write"} for org in user.orgs],
                "auth": {"type": "access_token", "accessToken": token},
            }
        )

    def _create_repo_route(self, req: _Request) -> _Response:
        user = self._required_user(req)
        payload = req.json()
        if payload.get("type", "model") != "model":
            raise HubError(400, "LocalHub only serves model repos")
        name = payload.get("name")
        namespace = payload.get("organization") or user.name
        if not isinstance(name, str) or not isinstance(namespace, str):
            raise HubError(400, "Repository name is required")
        if not _valid_repo_name(name):
            raise HubError(400, f"Invalid repo name: {_REPO_NAME_RULES}")
        if not _can_write(user, namespace):
            raise HubError(403, f"You don't have the rights to create a model under {namespace}")
        repo_id = f"{namespace}/{name}"
        repo_url = f"{self.url}/{repo_id}"
        if repo_id in self._repos:
            # The client needs `url` in the 409 body to honour exist_ok=True.
            return _json_response({"error": "You already created this model repo", "url": repo_url}, 409)
        private = payload.get("visibility") == "private" or payload.get("private") is True
        self._create_repo(repo_id, private=private, gated=False, author=user.name)
        return _json_response({"url": repo_url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, req: _Request) -> _Response:
        # The client calls .json() before checking the status, so every answer here is JSON.
        content = req.json().get("content", "")
        try:
            _parse_front_matter(content)
        except ValueError as err:
            return _json_response({"errors": [{"message": str(err)}], "warnings": []}, 400)
        return _json_response({"errors": [], "warnings": []})

    def _model_info(self, req: _Request, repo_id: str, rev: str) -> _Response:
        repo = self._readable_repo(req, repo_id)
        commit = repo.commits[self._resolve_revision(repo, rev)]
        with_blobs = req.flag("blobs")
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                entry = self._file_entry(path, commit.files[path])
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if "lfs" in entry:
                    # Siblings name the content hash `sha256` where tree entries call it `oid`.
                    lfs = entry["lfs"]
                    sibling["lfs"] = {
                        "sha256": lfs["oid"],
                        "size": lfs["size"],
                        "pointerSize": lfs["pointerSize"],
                    }
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo.namespace,
            "sha": commit.sha,
            "private": repo.private,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "createdAt": _iso(repo.created_at),
            "lastModified": _iso(commit.created_at),
            "siblings": siblings,
            "tags": [],
        }
        if "README.md" in commit.files:
            try:
                card = _parse_front_matter(self._blobs[commit.files["README.md"]].decode("utf-8", "replace"))
            except ValueError:
                card = None  # the Hub still serves the repo when its card metadata is broken
            if card:
                info["cardData"] = card
                info["tags"] = [str(tag) for tag in card.get("tags") or []]
                for key in ("library_name", "pipeline_tag"):
                    if key in card:
                        info[key] = card[key]
        return _json_response(info)

    def _tree(self, req: _Request, repo_id: str, rev: str, path: str) -> _Response:
        repo = self._readable_repo(req, repo_id)
        commit = repo.commits[self._resolve_revision(repo, rev)]
        prefix = path.strip("/")
        files = commit.files
        under = f"{prefix}/" if prefix else ""
        if prefix and not any(p.startswith(under) for p in files):
            raise HubError(404, f"{prefix} is not a directory at {rev}", "EntryNotFound")
        recursive, expand = req.flag("recursive"), req.flag("expand")
        directories: set[str] = set()
        file_paths: list[str] = []
        for file_path in files:
            if not file_path.startswith(under):
                continue
            parts = file_path[len(under) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):
                directories.add(under + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                file_paths.append(file_path)
        entries: list[dict[str, Any]] = []
        for directory in sorted(directories):
            subtree = {p: k for p, k in files.items() if p.startswith(directory + "/")}
            entry: dict[str, Any] = {
                "type": "directory",
                "oid": self._tree_oid(subtree),
                "size": 0,
                "path": directory,
            }
            if expand:
                entry["lastCommit"] = self._last_commit(repo, commit, directory + "/")
            entries.append(entry)
        for file_path in sorted(file_paths):
            entry = {"type": "file", **self._file_entry(file_path, files[file_path]), "path": file_path}
            if expand:
                entry["lastCommit"] = self._last_commit(repo, commit, file_path)
            entries.append(entry)
        return _json_response(entries)

    def _list_commits(self, req: _Request, repo_id: str, rev: str) -> _Response:
        repo = self._readable_repo(req, repo_id)
        history = self._history(repo, self._resolve_revision(repo, rev))
        return _json_response(
            [
                {
                    "id": c.sha,
                    "title": c.summary,
                    "message": c.description,
                    "authors": [{"user": c.author}],
                    "date": _iso(c.created_at),
                }
                for c in history
            ]
        )

    def _refs(self, req: _Request, repo_id: str) -> _Response:
        repo = self._readable_repo(req, repo_id)
        refs: dict[str, Any] = {
            "branches": [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                for name, sha in sorted(repo.branches.items())
            ],
            "converts": [],
            "tags": [
                {"name": name, "ref": f"refs/tags/{name}", "targetCommit": sha}
                for name, sha in sorted(repo.tags.items())
            ],
        }
        if req.flag("include_prs"):
            refs["pullRequests"] = [
                {"name": f"refs/pr/{num}", "ref": f"refs/pr/{num}", "targetCommit": sha}
                for num, sha in sorted(repo.pr_refs.items())
            ]
        return _json_response(refs)

    def _resolve_file(self, req: _Request, repo_id: str, rev: str, path: str) -> _Response:
        repo = self._readable_repo(req, repo_id)
        sha = self._resolve_revision(repo, rev)
        blob_key = repo.commits[sha].files.get(path)
        if blob_key is None:
            # X-Repo-Commit lets the client cache the file's absence under `.no_exist/<sha>/`.
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        content = self._blobs[blob_key]
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "X-Repo-Commit": sha,
        }
        if is_lfs(path, len(content)):
            # The cache names LFS blobs by sha256: the client takes X-Linked-Etag over ETag when present.
            headers["ETag"] = f'"{blob_key}"'
            headers["X-Linked-Etag"] = f'"{blob_key}"'
            headers["X-Linked-Size"] = str(len(content))
        else:
            headers["ETag"] = f'"{self._blob_git_sha1(blob_key)}"'
        byte_range = _parse_range(req.headers.get("Range"), len(content))
        if byte_range is None:
            if isinstance(content, SparseFile) and req.method == "GET":
                raise HubError(501, f"{path} is a sparse test file: read it by range")
            return _Response(200, content, headers)
        start, end = byte_range
        headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        with self._lock:
            answer = self._tampers.get((repo_id, path))
        if answer is not None and req.method == "GET":
            lie = answer(start, end, content)
            assert len(lie) == end + 1 - start, "a tampered answer keeps the length"
            return _Response(206, lie, headers)
        return _Response(206, content[start : end + 1], headers)

    # ------------------------------------------------------------------ upload routes

    def _preupload(self, req: _Request, repo_id: str, rev: str) -> _Response:
        repo, _ = self._writable_repo(req, repo_id)
        target = self._commit_target(repo, rev, create_pr=req.flag("create_pr"))
        remote = repo.commits[target[1]].files
        answers = []
        for item in _list_of_objects(req.json().get("files")):
            path, size = item.get("path"), item.get("size")
            if not isinstance(path, str) or not isinstance(size, int):
                raise HubError(400, "Each file needs a path and a size")
            remote_key = remote.get(path)
            remote_oid = None
            if remote_key is not None:
                # The client compares this with its local oid (sha256 for LFS, git sha1 otherwise) to skip
                # unchanged files, so it must be in the form the existing file is stored in.
                remote_size = len(self._blobs[remote_key])
                lfs = is_lfs(path, remote_size)
                remote_oid = remote_key if lfs else self._blob_git_sha1(remote_key)
            answers.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if is_lfs(path, size) else "regular",
                    "shouldIgnore": False,
                    "oid": remote_oid,
                }
            )
        return _json_response({"files": answers})

    def _lfs_batch(self, req: _Request, repo_id: str) -> _Response:
        self._writable_repo(req, repo_id)
        payload = req.json()
        if payload.get("operation") != "upload":
            raise HubError(400, "LocalHub only supports LFS uploads through the batch API")
        objects = []
        for obj in _list_of_objects(payload.get("objects")):
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not _is_sha256(oid) or not isinstance(size, int) or size < 0:
                error = {"code": 422, "message": "Invalid object"}
                objects.append({"oid": str(oid), "size": 0, "error": error})
                continue
            if oid in self._blobs and len(self._blobs[oid]) == size:
                objects.append({"oid": oid, "size": size})  # no actions: already stored
                continue
            # The client PUTs without Authorization, so the URL itself is the credential.
            capability = secrets.token_urlsafe(24)
            self._pending_uploads[capability] = (oid, size)
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "actions": {
                        "upload": {"href": f"{self.url}/lfs-upload/{capability}"},
                        "verify": {"href": f"{self.url}/{repo_id}.git/info/lfs/verify"},
                    },
                }
            )
        answer = {"transfer": "basic", "objects": objects}
        return _json_response(answer, content_type="application/vnd.git-lfs+json")

    def _lfs_put(self, req: _Request, capability: str) -> _Response:
        pending = self._pending_uploads.get(capability)
        if pending is None:
            raise HubError(404, "Unknown or already used upload URL")
        oid, size = pending
        if len(req.body) != size or hashlib.sha256(req.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match oid {oid} and size {size}")
        self._blobs[oid] = req.body
        del self._pending_uploads[capability]
        return _Response(200)

    def _lfs_verify(self, req: _Request, repo_id: str) -> _Response:
        self._writable_repo(req, repo_id)
        payload = req.json()
        oid, size = payload.get("oid"), payload.get("size")
        if not isinstance(oid, str) or oid not in self._blobs or len(self._blobs[oid]) != size:
            raise HubError(404, f"LFS object {oid} not found")
        return _json_response({"success": True})

    def _commit_route(self, req: _Request, repo_id: str, rev: str) -> _Response:
        repo, user = self._writable_repo(req, repo_id)
        create_pr = req.flag("create_pr")
        header, operations = _parse_ndjson(req.body)
        summary = header.get("summary")
        if not isinstance(summary, str) or not summary.strip():
            raise HubError(400, "The commit summary is required")
        parent = header.get("parentCommit")
        ref_kind, base = self._commit_target(repo, rev, create_pr)
        if parent is not None:
            if not isinstance(parent, str):
                raise HubError(400, "parentCommit must be a commit sha")
            if create_pr:
                # A pull request starts from the given parent instead of the branch tip.
                base = self._resolve_revision(repo, parent)
            elif not base.startswith(parent):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
        snapshot, new_blobs = self._apply_operations(repo.commits[base].files, operations)
        self._blobs.update(new_blobs)
        description = str(header.get("description") or "")
        sha = self._new_commit(repo, base, snapshot, summary, description, user.name)
        answer: dict[str, Any] = {
            "success": True,
            "commitOid": sha,
            "commitUrl": f"{self.url}/{repo_id}/commit/{sha}",
            "hookOutput": "",
        }
        if create_pr:
            discussion = self._open_discussion(repo, summary, description, user, True)
            discussion.base_branch = rev
            repo.pr_refs[discussion.num] = sha
            answer["pullRequestUrl"] = f"{self.url}/{repo_id}/discussions/{discussion.num}"
        elif ref_kind.startswith("refs/pr/"):
            repo.pr_refs[int(ref_kind.removeprefix("refs/pr/"))] = sha
        else:
            repo.branches[ref_kind] = sha
        return _json_response(answer)

    def _commit_target(self, repo: _Repo, rev: str, create_pr: bool) -> tuple[str, str]:
        """(ref the commit moves, its current sha). Only branches and open PR refs accept commits."""
        if rev in repo.branches:
            return rev, repo.branches[rev]
        match = _PR_REF_RE.fullmatch(rev)
        if match and int(match.group(1)) in repo.pr_refs and not create_pr:
            return rev, repo.pr_refs[int(match.group(1))]
        self._resolve_revision(repo, rev)  # 404 RevisionNotFound when it does not exist at all
        accepted = "a branch" if create_pr else "a branch or a pull request"
        raise HubError(400, f"Invalid rev id: {rev} is not {accepted}")

    def _apply_operations(
        self, files: Mapping[str, str], operations: list[tuple[str, dict[str, Any]]]
    ) -> tuple[dict[str, str], dict[str, bytes]]:
        """Apply ndjson operations in order; validates everything before the caller changes any state."""
        snapshot = dict(files)
        new_blobs: dict[str, bytes] = {}
        for key, value in operations:
            path = _check_path(value.get("path"))
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding for {path}")
                try:
                    content = base64.b64decode(value.get("content", ""), validate=True)
                except ValueError as err:
                    raise HubError(400, f"Invalid base64 content for {path}") from err
                blob_key = hashlib.sha256(content).hexdigest()
                new_blobs[blob_key] = content
                snapshot[path] = blob_key
            elif key == "lfsFile":
                oid = value.get("oid")
                if (
                    not isinstance(oid, str)
                    or oid not in self._blobs
                    or len(self._blobs[oid]) != value.get("size")
                ):
                    raise HubError(400, f"LFS object {oid} for {path} was not uploaded")
                snapshot[path] = oid
            elif key == "deletedFile":
                if path not in snapshot:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del snapshot[path]
            elif key == "deletedFolder":
                folder = path.rstrip("/") + "/"
                doomed = [p for p in snapshot if p.startswith(folder)]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for doomed_path in doomed:
                    del snapshot[doomed_path]
            else:
                raise HubError(400, f"Unsupported commit operation {key!r}")
        return snapshot, new_blobs

    def _create_branch_route(self, req: _Request, repo_id: str, branch: str) -> _Response:
        repo, _ = self._writable_repo(req, repo_id)
        if not branch or branch.startswith("refs/") or branch in repo.tags or not _is_ref_name(branch):
            raise HubError(400, f"Invalid reference for a branch: {branch}")
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        starting_point = req.json().get("startingPoint") or "main"
        repo.branches[branch] = self._resolve_revision(repo, str(starting_point))
        return _json_response({})

    def _create_discussion(self, req: _Request, repo_id: str) -> _Response:
        repo, user = self._writable_repo(req, repo_id)
        payload = req.json()
        title = payload.get("title")
        if not isinstance(title, str) or not title.strip():
            raise HubError(400, "A title is required")
        discussion = self._open_discussion(
            repo, title.strip(), str(payload.get("description") or ""), user, bool(payload.get("pullRequest"))
        )
        if discussion.is_pull_request:
            repo.pr_refs[discussion.num] = repo.branches["main"]
        return _json_response(
            {
                "num": discussion.num,
                "url": f"{self.url}/{repo_id}/discussions/{discussion.num}",
                "pullRequest": discussion.is_pull_request,
            }
        )

    def _discussion_details(self, req: _Request, repo_id: str, num: str) -> _Response:
        repo = self._readable_repo(req, repo_id)
        discussion = repo.discussions.get(int(num)) if num.isdigit() else None
        if discussion is None:
            raise HubError(404, f"Discussion {num} not found")
        return _json_response(
            {
                "num": discussion.num,
                "title": discussion.title,
                "status": discussion.status,
                "createdAt": _iso(discussion.created_at),
                "author": {"name": discussion.author},
                "repo": {"name": repo_id, "type": "model"},
                "isPullRequest": discussion.is_pull_request,
                "events": [
                    {
                        "id": f"{discussion.num:024x}",
                        "type": "comment",
                        "createdAt": _iso(discussion.created_at),
                        "author": {"name": discussion.author},
                        "data": {"edited": False, "hidden": False, "latest": {"raw": discussion.description}},
                    }
                ],
                "changes": {"base": f"refs/heads/{discussion.base_branch}"},
                "filesWithConflicts": [],
                "diff": "",
            }
        )

    # ------------------------------------------------------------------ repo state internals

    @staticmethod
    def _split_repo_id(repo_id: str) -> tuple[str, str]:
        namespace, sep, name = repo_id.partition("/")
        if not sep or "/" in name:
            raise ValueError(f"LocalHub repo ids are 'namespace/name', got {repo_id!r}")
        return namespace, name

    def _repo(self, repo_id: str) -> _Repo:
        if repo_id not in self._repos:
            raise KeyError(f"No repo {repo_id}")
        return self._repos[repo_id]

    def _create_repo(self, repo_id: str, private: bool, gated: bool, author: str) -> str:
        repo = _Repo(repo_id=repo_id, private=private, gated=gated, created_at=time.time())
        sha = self._new_commit(
            repo, None, {".gitattributes": self._store_blob(_GITATTRIBUTES)}, "initial commit", "", author
        )
        repo.branches["main"] = sha
        self._repos[repo_id] = repo
        return sha

    def _new_commit(
        self,
        repo: _Repo,
        parent: str | None,
        files: dict[str, str],
        summary: str,
        description: str,
        author: str,
    ) -> str:
        # A per-server counter makes every sha unique, even for identical trees and messages.
        seed = json.dumps([next(self._commit_counter), repo.repo_id, parent, summary, sorted(files.items())])
        sha = hashlib.sha1(seed.encode()).hexdigest()
        # Read-only, because `commits()` hands these snapshots to tests.
        snapshot = MappingProxyType(files)
        repo.commits[sha] = HubCommit(sha, parent, summary, description, author, time.time(), snapshot)
        return sha

    def _open_discussion(
        self, repo: _Repo, title: str, description: str, user: _User, is_pull_request: bool
    ) -> PullRequest:
        num = max(repo.discussions, default=0) + 1
        discussion = PullRequest(num, title, description, user.name, time.time(), is_pull_request)
        repo.discussions[num] = discussion
        return discussion

    def _history(self, repo: _Repo, sha: str) -> list[HubCommit]:
        history = []
        current: str | None = sha
        while current is not None:
            commit = repo.commits[current]
            history.append(commit)
            current = commit.parent
        return history

    def _resolve(self, repo: _Repo, rev: str) -> str | None:
        """Branch, then tag, then `refs/pr/N`, then a full sha, then a unique sha prefix of 7+ characters."""
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.tags:
            return repo.tags[rev]
        match = _PR_REF_RE.fullmatch(rev)
        if match:
            return repo.pr_refs.get(int(match.group(1)))
        if _SHA_RE.fullmatch(rev):
            return rev if rev in repo.commits else None
        if _SHA_PREFIX_RE.fullmatch(rev):
            candidates = [sha for sha in repo.commits if sha.startswith(rev)]
            return candidates[0] if len(candidates) == 1 else None
        return None

    def _resolve_revision(self, repo: _Repo, rev: str) -> str:
        sha = self._resolve(repo, rev)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return sha

    def _resolve_or_raise(self, repo: _Repo, rev: str) -> str:
        sha = self._resolve(repo, rev)
        if sha is None:
            raise KeyError(f"{repo.repo_id} has no revision {rev!r}")
        return sha

    def _store_blob(self, content: bytes) -> str:
        key = content.sha256 if isinstance(content, (SparseFile, DiskFile)) else hashlib.sha256(content).hexdigest()
        self._blobs[key] = content
        return key

    def _blob_git_sha1(self, blob_key: str) -> str:
        if blob_key not in self._git_sha1:
            self._git_sha1[blob_key] = git_blob_sha1(self._blobs[blob_key])
        return self._git_sha1[blob_key]

    def _file_entry(self, path: str, blob_key: str) -> dict[str, Any]:
        """Tree-entry fields of a file: its git oid (of the pointer, for LFS files), size and LFS info."""
        size = len(self._blobs[blob_key])
        if not is_lfs(path, size):
            return {"oid": self._blob_git_sha1(blob_key), "size": size}
        pointer = lfs_pointer(blob_key, size)
        return {
            "oid": git_blob_sha1(pointer),
            "size": size,
            "lfs": {"oid": blob_key, "size": size, "pointerSize": len(pointer)},
        }

    def _tree_oid(self, files: Mapping[str, str]) -> str:
        # A stable id for the folder's content; not git's tree hash, which nothing in the client checks.
        listing = "\n".join(f"{p} {self._file_entry(p, key)['oid']}" for p, key in sorted(files.items()))
        return hashlib.sha1(listing.encode()).hexdigest()

    def _last_commit(self, repo: _Repo, commit: HubCommit, path: str) -> dict[str, str]:
        """The newest commit in `commit`'s history that changed `path` (a file, or a folder ending in "/")."""

        folder = path.endswith("/")

        def view(c: HubCommit) -> dict[str, str]:
            return {p: k for p, k in c.files.items() if p == path or (folder and p.startswith(path))}

        current = commit
        while current.parent is not None and view(repo.commits[current.parent]) == view(current):
            current = repo.commits[current.parent]
        return {"id": current.sha, "title": current.summary, "date": _iso(current.created_at)}


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: LocalHub

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (killed mid-download by a test) is expected; anything else is printed."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so the client's connection pool can keep connections alive; every answer has a Content-Length.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without TCP_NODELAY each keep-alive answer can stall on
    # the peer's delayed ACK.
    disable_nagle_algorithm = True
    server: _HubHTTPServer

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    # Skip trailers up to the blank line that ends the message.
                    while self.rfile.readline().strip():
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        body = self._read_body()
        hold = self.server.hub._take_hold(
            self.command, self.path, "Range" in self.headers, self.headers.get("Range")
        )
        if hold is not None:  # outside the hub's lock: other requests go on while this one waits
            hold.arrived.set()
            hold.release.wait()
        response = self.server.hub._handle(self.command, self.path, self.headers, body)
        if response is None:
            self.close_connection = True
            return
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        # A HEAD answer carries the length of the GET body it describes, without the body.
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD" and response.body:
            if response.cut:
                self.wfile.write(response.body[: len(response.body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            if isinstance(response.body, DiskFile):
                for block in response.body.chunks():
                    self.wfile.write(block)
                return
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request stderr lines; `LocalHub.requests` is the log."""


def _can_write(user: _User | None, namespace: str, repo_id: str | None = None) -> bool:
    if user is None or not (namespace == user.name or namespace in user.orgs):
        return False
    if user.scoped is None:
        return True
    return any("repo.write" in user.scoped.get(entity, ()) for entity in (namespace, repo_id) if entity)


def _valid_repo_name(name: str) -> bool:
    """The Hub's naming rules, which the client also enforces before sending anything."""
    return (
        _NAME_RE.fullmatch(name) is not None
        and "--" not in name
        and ".." not in name
        and name[0] not in "-."
        and name[-1] not in "-."
        and not name.endswith(".git")
    )


def _list_of_objects(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise HubError(400, "Expected a list of objects")
    return value


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_ref_name(name: str) -> bool:
    return not any(bad in name for bad in ("..", "~", "^", ":", "\\", " ", "?", "*", "[", "//")) and not (
        name.startswith("/") or name.endswith(("/", ".lock"))
    )


def _check_path(path: Any) -> str:
    if (
        not isinstance(path, str)
        or not path
        or path.startswith("/")
        or any(part in ("", ".", "..") for part in path.rstrip("/").split("/"))
    ):
        raise HubError(400, f"Invalid path in commit: {path!r}")
    return path


def _parse_ndjson(body: bytes) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """Split a commit payload into its header value and its (key, value) operations."""
    items = []
    for line in body.splitlines():
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as err:
            raise HubError(400, f"Malformed ndjson line: {err}") from err
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("key"), str)
            or not isinstance(item.get("value"), dict)
        ):
            raise HubError(400, "Each ndjson line must be {'key': str, 'value': object}")
        items.append((item["key"], item["value"]))
    if not items or items[0][0] != "header":
        raise HubError(400, "The first ndjson line must be the header")
    return items[0][1], items[1:]


def _range_start(header: str | None) -> int:
    """The first byte a `bytes=N-M` Range header asks for; -1 without one (or for a suffix range)."""
    if header is None or not header.startswith("bytes="):
        return -1
    first = header.removeprefix("bytes=").partition("-")[0].strip()
    return int(first) if first.isdigit() else -1


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `bytes=` range; None to send the whole body (no or multiple ranges)."""
    if header is None or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header.removeprefix("bytes=").strip().partition("-")
    try:
        if first == "":
            start, end = max(size - int(last), 0), size - 1  # suffix range: the last N bytes
        else:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
    except ValueError:
        return None
    if start >= size or start > end:
        raise HubError(416, f"Range {header} not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, end


def _parse_front_matter(text: str) -> dict[str, Any] | None:
    """The README's YAML metadata; None without front matter or without PyYAML (then nothing is checked)."""
    match = _FRONT_MATTER_RE.match(text)
    if match is None:
        return None
    try:
        import yaml
    except ImportError:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        raise ValueError(f"Invalid YAML in the metadata block: {err}") from err
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError("The metadata block must be a YAML mapping")
    return data
