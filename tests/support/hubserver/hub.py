"""`LocalHub`: an in-memory Hub served on 127.0.0.1 (see the package docstring for its scope)."""

from __future__ import annotations

import itertools
import threading
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from email.message import Message
from http.server import ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qs, unquote

from .faults import Hold, RequestRecord, _Fault, _Faults
from .http import HubError, _Handler, _HubHTTPServer, _json_response, _Request, _Response
from .refs import _RepoStore
from .routes import _Routes
from .rules import _range_start, _valid_repo_name
from .storage import _REPO_NAME_RULES, HubCommit, PullRequest, _Repo, _User


class LocalHub(_Routes, _RepoStore, _Faults):
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
