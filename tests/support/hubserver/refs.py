"""Git-ish repo state: commits and their history, branches, tags and pull-request refs resolved to shas,
content-addressed blobs and tree oids."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .http import HubError
from .storage import (
    _GITATTRIBUTES,
    _PR_REF_RE,
    _SHA_PREFIX_RE,
    _SHA_RE,
    DiskFile,
    HubCommit,
    PullRequest,
    SparseFile,
    _iso,
    _Repo,
    _User,
    git_blob_sha1,
    is_lfs,
    lfs_pointer,
)


class _RepoStore:
    """Repo state internals of `LocalHub` (a mixin): creation, commits, history and refs."""

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
        key = (
            content.sha256
            if isinstance(content, (SparseFile, DiskFile))
            else hashlib.sha256(content).hexdigest()
        )
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
