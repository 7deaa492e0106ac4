"""The local Hub's API routes: auth, account and repo reads, and the upload routes (preupload, the LFS
batch API and its PUT and verify URLs, ndjson commits, branches, discussions)."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .http import HubError, _json_response, _Request, _Response
from .rules import (
    _can_write,
    _check_path,
    _is_ref_name,
    _is_sha256,
    _list_of_objects,
    _parse_front_matter,
    _parse_ndjson,
    _parse_range,
    _valid_repo_name,
)
from .storage import (
    _INVALID_CREDENTIALS,
    _PR_REF_RE,
    _REPO_NAME_RULES,
    SparseFile,
    _iso,
    _Repo,
    _User,
    is_lfs,
)


class _Routes:
    """The HTTP API of `LocalHub` (a mixin): one method per route, after `_route` dispatches."""

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
