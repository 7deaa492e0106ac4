"""Publish: push the finished output folder to a Hub model repo in one commit.

The token is checked before any merge work (a missing token, or one that cannot write to the target
namespace or repo, fine-grained scopes included, fails in a second, not after the merge). Uploads go through `huggingface_hub`, so the stored
login, `HF_TOKEN`, Xet and LFS all behave as with `hf upload`. Identical content makes no new commit.
"""

from __future__ import annotations

import glob
import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PublishError
from ..merging.plan import MergePlan
from ..sources.resolve import LICENSE_FILES, TOKENIZER_FILES
from .lock import LOCK_FILE, RECIPE_COPY

__all__ = ["PushResult", "ShardUploader", "check_push_access", "push", "push_companion"]


@dataclass(frozen=True)
class PushResult:
    url: str  # the commit, or the pull request
    changed: bool  # False when the repo already held exactly these files


def _hub_failure(repo: str, exc: Exception) -> PublishError:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 401:
            return PublishError(
                f"the Hub rejected the token while pushing to {repo} (401); run `hf auth login` or fix HF_TOKEN"
            )
        if status == 403:
            return PublishError(
                f"the token may not write to {repo} (403); use a token with write access to its namespace"
            )
        return PublishError(
            f"pushing to {repo} failed: the Hub answered {status}; re-run to retry ({exc.server_message or exc})"
        )
    return PublishError(f"pushing to {repo} failed ({type(exc).__name__}: {exc}); re-run to retry")


def check_push_access(plan: MergePlan, token: str | None = None) -> str:
    """Fail early unless a token that can write to the target namespace is available (`token`, or the one
    huggingface_hub finds); return the user name."""
    import os

    from huggingface_hub import HfApi, get_token

    repo = plan.recipe.output.repo
    assert repo is not None
    try:
        token = token or get_token()
    except Exception as exc:  # trusted publishing (HF_OIDC_RESOURCE) failed to mint or exchange a token
        raise PublishError(
            f"trusted publishing for {repo} failed ({type(exc).__name__}: {' '.join(str(exc).split())}); add a "
            "trusted publisher for this repo and give the job `permissions: id-token: write`, or set HF_TOKEN"
        ) from None
    if token is None:
        raise PublishError(
            f"[output] repo = {repo!r} needs a Hugging Face token with write access: set HF_TOKEN or run "
            "`hf auth login`, or pass --no-push to only write the folder"
        )
    if os.environ.get("HF_OIDC_RESOURCE") == repo:
        # A trusted-publishing token is scoped to this one repo; the push itself reports a refusal.
        return "trusted publisher"
    try:
        who: dict[str, Any] = HfApi(token=token).whoami()
    except Exception as exc:
        raise _hub_failure(repo, exc) from None
    namespace = repo.split("/")[0]
    allowed = {who.get("name")} | {org.get("name") for org in who.get("orgs", [])}
    if namespace not in allowed:
        raise PublishError(
            f"the token belongs to {who.get('name')!r}, which cannot write to the namespace {namespace!r}; "
            f"use a token of {namespace!r} or change [output] repo"
        )
    access = who.get("auth", {}).get("accessToken", {})
    role = access.get("role")
    if role == "read":
        raise PublishError(
            "the token is read-only; create a write token at /settings/tokens and set HF_TOKEN"
        )
    if role == "fineGrained" and not _fine_grained_can_write(access.get("fineGrained") or {}, repo):
        raise PublishError(
            f"the fine-grained token {access.get('displayName')!r} has no write permission for {repo}; at "
            f"/settings/tokens give it write access to the repos of {namespace!r} (or to {repo} if it exists)"
        )
    return str(who.get("name"))


def _fine_grained_can_write(grants: dict[str, Any], repo: str) -> bool:
    """Whether a fine-grained token's scopes (whoami's `auth.accessToken.fineGrained`) allow pushing to `repo`.

    Write access is granted per entity: the user or organisation (all its repos, and creating new ones), or
    the one repo.
    """
    namespace = repo.split("/")[0]
    for scope in grants.get("scoped") or []:
        entity = scope.get("entity") or {}
        kind, name = entity.get("type"), entity.get("name")
        applies = (kind in ("user", "org") and name == namespace) or (kind == "model" and name == repo)
        if applies and "repo.write" in (scope.get("permissions") or []):
            return True
    return False


def _commit_description(plan: MergePlan) -> str:
    lines = [f"Merged with hubmerge, method `{plan.recipe.method.name}`.", ""]
    for source in plan.weight_sources:
        pinned = f" @ {source.sha}" if source.sha else ""
        lines.append(f"- {source.label}{pinned}")
    return "\n".join(lines)


def _managed_files(api: Any, repo: str, branch: str) -> list[str]:
    """Patterns of the files a hubmerge output may hold: those the new output lacks are deleted by the push.

    A new merge may have fewer shards, another tokenizer (no chat_template.jinja) or no LICENSE: what the
    previous output put there must not linger. Files hubmerge never writes (a user's own) are left alone.
    The previous output's lock lists what it wrote, including a `[card] template` at any path.
    """
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    patterns = [
        "*.safetensors",
        "model.safetensors.index.json",
        "config.json",
        *TOKENIZER_FILES,
        *LICENSE_FILES,
        RECIPE_COPY,
        LOCK_FILE,
    ]
    try:
        previous = json.loads(Path(api.hf_hub_download(repo, LOCK_FILE, revision=branch)).read_text())
        listed = previous["output"]["files"]
    except (EntryNotFoundError, RevisionNotFoundError, ValueError, KeyError, TypeError):
        return patterns
    return [*patterns, *(glob.escape(name) for name in listed if isinstance(name, str))]


_ATTEMPTS = 3  # a branch that moves under us is retried on its new tip this many times


def _commit_message(plan: MergePlan) -> str:
    return f"hubmerge: {plan.recipe.path.name} ({plan.recipe.method.name})"


def _create_target(api: Any, plan: MergePlan, repo: str) -> None:
    """Create `repo` (the output's, or the GGUF companion's) and `[output] branch` in it when needed."""
    out = plan.recipe.output
    api.create_repo(repo, private=out.private, exist_ok=True)
    if (out.branch or "main") != "main":
        api.create_branch(repo, branch=out.branch, exist_ok=True)


def _retrying(plan: MergePlan, repo: str, push_once: Callable[[], PushResult]) -> PushResult:
    """`push_once()`, redone on the new tip while the branch moves under it (409/412); errors as one line."""
    from huggingface_hub.errors import HfHubHTTPError

    branch = plan.recipe.output.branch or "main"
    try:
        attempt = 1
        while True:
            try:
                return push_once()
            except HfHubHTTPError as exc:
                moved = exc.response is not None and exc.response.status_code in (409, 412)
                if not moved:
                    raise
                if attempt == _ATTEMPTS:
                    raise PublishError(
                        f"pushing to {repo} failed: its branch {branch!r} moved under every one of "
                        f"{_ATTEMPTS} attempts (another push is running?); re-run when it is done"
                    ) from None
                attempt += 1
    except PublishError:
        raise
    except Exception as exc:
        raise _hub_failure(repo, exc) from None


def push(plan: MergePlan, folder: Path, token: str | None = None) -> PushResult:
    """Create the repo if needed and upload `folder` to its branch or as a pull request, with `token` (default:
    the one huggingface_hub finds).

    The commit names the branch tip it was computed against (deletions included); when someone else
    pushes in between, the Hub refuses it (412 or 409) and the push is redone on the new tip.
    """
    from huggingface_hub import HfApi

    repo = plan.recipe.output.repo
    assert repo is not None
    api = HfApi(token=token)
    try:
        _create_target(api, plan, repo)
    except Exception as exc:
        raise _hub_failure(repo, exc) from None
    return _retrying(
        plan, repo, lambda: _push_once(api, plan, folder, repo, plan.recipe.output.branch or "main")
    )


def _companion_message(plan: MergePlan) -> str:
    return f"hubmerge: GGUF files of {plan.recipe.output.repo}"


def push_companion(plan: MergePlan, folder: Path) -> PushResult:
    """Push the GGUF folder to `[output] gguf_repo` (by default `{repo}-GGUF`) in one commit, to `[output]
    branch` or as a pull request (`create_pr`), as `push` does for the weights."""
    from huggingface_hub import HfApi

    out = plan.recipe.output
    repo = out.gguf_repo
    assert repo is not None
    api = HfApi()
    try:
        _create_target(api, plan, repo)
    except Exception as exc:
        raise _hub_failure(repo, exc) from None

    def push_once() -> PushResult:
        branch = out.branch or "main"
        before = _tip(api, repo, branch)
        info = api.upload_folder(
            repo_id=repo,
            folder_path=folder,
            revision=branch,
            commit_message=_companion_message(plan),
            create_pr=out.create_pr,
            parent_commit=None if out.create_pr else before,
            delete_patterns=["*.gguf"],
        )
        return _pushed(info, before)

    return _retrying(plan, repo, push_once)


def _push_once(api: Any, plan: MergePlan, folder: Path, repo: str, branch: str) -> PushResult:
    out = plan.recipe.output
    before = _tip(api, repo, branch)
    info = api.upload_folder(
        repo_id=repo,
        folder_path=folder,
        revision=branch,
        commit_message=_commit_message(plan),
        commit_description=_commit_description(plan),
        create_pr=out.create_pr,
        parent_commit=None if out.create_pr else before,
        delete_patterns=_managed_files(api, repo, before or branch),
    )
    return _pushed(info, before)


def _tip(api: Any, repo: str, branch: str) -> str | None:
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        return str(api.repo_info(repo, revision=branch).sha)
    except RevisionNotFoundError:
        return None


def _pushed(info: Any, before: str | None) -> PushResult:
    if info.pr_url:
        return PushResult(info.pr_url, True)
    return PushResult(info.commit_url, info.oid != before)


class ShardUploader:
    """Upload the output shards to `[output] repo` while the merge writes the next ones; commit once at the end.

    Each shard handed to `submit` goes up as an LFS object (`HfApi.preupload_lfs_files`, Xet when available)
    on a background thread. An uploaded object belongs to no commit: a run that dies before `finish` leaves
    the branch as it was, and a rerun finds the identical objects already stored on the Hub. `finish` then
    makes the one commit from the shards' recorded sha256 and size plus the side files in the output folder:
    the same files, deletions and message as `push`. The commit needs no shard bytes, so with
    `delete_uploaded` each shard is deleted locally as soon as it is stored.

    At most one shard waits for or is in upload: `submit` blocks until the previous one is done, so with
    `delete_uploaded` at most two shards are on the disk (the one uploading and the one being written).
    """

    def __init__(self, plan: MergePlan, *, delete_uploaded: bool = False, companion: bool = False) -> None:
        """With `companion`, the files go to the GGUF repo (`[output] gguf_repo`) instead of `[output] repo`,
        in a commit of their own, on the same branch or pull request setting."""
        from huggingface_hub import HfApi

        repo = plan.recipe.output.gguf_repo if companion else plan.recipe.output.repo
        assert repo is not None
        self.plan = plan
        self.repo: str = repo
        self.companion = companion
        self.branch = plan.recipe.output.branch or "main"
        self.delete_uploaded = delete_uploaded
        self.bytes_out = 0  # LFS bytes stored on the Hub so far
        self.seconds = 0.0  # time spent uploading them
        self._api = HfApi()
        self._created = False
        # The branch tip when the uploads began: the commit's parent, so that a push landing on the branch
        # while this run uploads is detected (412) and the commit redone on the new tip.
        self._tips: list[str | None] = []
        # path in repo -> its CommitOperationAdd, whose content is stored on the Hub
        self._uploaded: dict[str, Any] = {}
        # path in repo -> (size, sha256) of the uploaded files deleted from the disk
        self._deleted: dict[str, tuple[int, str]] = {}
        self._error: Exception | None = None
        self._cancelled = threading.Event()
        self._slot = threading.Semaphore(1)
        self._jobs: queue.Queue[tuple[Path, str] | None] = queue.Queue()
        # A daemon: a signal exits the process without waiting for an upload in flight (nothing is committed).
        self._thread = threading.Thread(target=self._work, name="hubmerge-upload", daemon=True)
        self._thread.start()

    def submit(self, path: Path, *, keep: bool = False) -> None:
        """Upload the finished file `path` in the background (again, if it was rewritten since); with
        `delete_uploaded` and not `keep`, delete it once stored. Blocks while the previous file uploads.

        With `delete_uploaded`, an earlier failed upload is raised here (the disk would fill otherwise);
        without it, the merge goes on and `finish` reports the failure once the output is written.
        """
        self._queue(path, "keep" if keep else "upload")

    def release(self, path: Path) -> None:
        """Delete `path`, submitted earlier with `keep`, once its upload is done (with `delete_uploaded`)."""
        if self.delete_uploaded:
            self._queue(path, "release")

    def wait(self) -> None:
        """Block until every submitted file is uploaded (or has failed: `finish` raises that)."""
        self._jobs.join()

    def deleted(self) -> dict[str, tuple[int, str]]:
        """The uploaded files deleted from the disk: path in repo -> (size, sha256)."""
        return dict(self._deleted)

    def status(self) -> str:
        """Bytes out and throughput, for the progress bar."""
        rate = self.bytes_out / self.seconds / 1e6 if self.seconds else 0.0
        return f"up {self.bytes_out / 1e6:,.1f} MB at {rate:,.1f} MB/s"

    def cancel(self) -> None:
        """Stop uploading (what is in flight finishes or fails on its own thread); nothing is committed."""
        self._cancelled.set()
        self._jobs.put(None)

    def finish(self, folder: Path) -> PushResult:
        """Wait for the uploads, upload the side files in `folder`, and make the one commit."""
        self.wait()
        self._jobs.put(None)
        if self._error is not None:
            raise _hub_failure(self.repo, self._error)
        return _retrying(self.plan, self.repo, lambda: self._commit(folder))

    # --- the upload thread ---------------------------------------------------------------------------------

    def _queue(self, path: Path, kind: str) -> None:
        self._slot.acquire()  # the previous job is done: uploaded, or failed
        if self._error is not None and self.delete_uploaded:
            self._slot.release()
            raise _hub_failure(self.repo, self._error)
        self._jobs.put((path, kind))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self._error is None and not self._cancelled.is_set():
                    self._run(*job)
            except Exception as exc:
                self._error = exc
            finally:
                self._slot.release()
                self._jobs.task_done()
        self._jobs.task_done()

    def _run(self, path: Path, kind: str) -> None:
        from huggingface_hub import CommitOperationAdd

        name = path.name
        if kind != "release":
            if not self._created:
                _create_target(self._api, self.plan, self.repo)
                self._created = True
                self._tips.append(_tip(self._api, self.repo, self.branch))
            start = time.monotonic()
            addition = CommitOperationAdd(path_in_repo=name, path_or_fileobj=path)
            self._api.preupload_lfs_files(
                self.repo,
                additions=[addition],
                revision=self.branch,
                create_pr=self.plan.recipe.output.create_pr,
                num_threads=1,
            )
            # An LFS upload frees the content (`free_memory`, the default: the documented sign that it is
            # stored); a file the Hub wants inline keeps it, and the commit takes it from the folder.
            if addition.path_or_fileobj != b"":
                self._uploaded.pop(name, None)
                return
            self.seconds += time.monotonic() - start
            self.bytes_out += addition.upload_info.size
            # `preupload_lfs_files` replaced the content by b"": from here on the commit needs only the
            # sha256 and size it recorded, never the file.
            self._uploaded[name] = addition
        stored = self._uploaded.get(name)
        if self.delete_uploaded and kind != "keep" and stored is not None:
            path.unlink()
            self._deleted[name] = (stored.upload_info.size, stored.upload_info.sha256.hex())

    # --- the commit ----------------------------------------------------------------------------------------

    def _commit(self, folder: Path) -> PushResult:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete
        from huggingface_hub.hf_api import RepoFile
        from huggingface_hub.utils import (  # type: ignore[attr-defined]  # lazily exported
            DEFAULT_IGNORE_PATTERNS,
            filter_repo_objects,
        )

        out = self.plan.recipe.output
        before = self._tips.pop() if self._tips else _tip(self._api, self.repo, self.branch)
        remote = {
            entry.path: entry
            for entry in self._api.list_repo_tree(self.repo, revision=before or self.branch, recursive=True)
            if isinstance(entry, RepoFile)
        }
        local = {p.relative_to(folder).as_posix(): p for p in sorted(folder.glob("**/*")) if p.is_file()}
        names = sorted(
            set(filter_repo_objects(local, ignore_patterns=DEFAULT_IGNORE_PATTERNS)) | set(self._uploaded)
        )
        additions = []
        for name in names:
            addition = self._uploaded.get(name)
            if addition is None:
                additions.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=local[name]))
                continue
            # Stored already: the commit names it by sha256 and size, unless the branch holds those very bytes
            # (an identical re-push makes no commit; huggingface_hub drops its own unchanged files likewise).
            lfs = remote[name].lfs if name in remote else None
            if lfs is None or lfs.sha256 != addition.upload_info.sha256.hex():
                additions.append(addition)
        managed = _managed_files(self._api, self.repo, before or self.branch)
        deletions = [
            CommitOperationDelete(path_in_repo=path, is_folder=False)
            for path in filter_repo_objects(sorted(remote), allow_patterns=managed)
            if path != ".gitattributes" and path not in set(names)
        ]
        info = self._api.create_commit(
            self.repo,
            operations=[*deletions, *additions],
            commit_message=_companion_message(self.plan) if self.companion else _commit_message(self.plan),
            commit_description=_commit_description(self.plan),
            revision=self.branch,
            create_pr=out.create_pr,
            parent_commit=None if out.create_pr else before,
        )
        return _pushed(info, before)
