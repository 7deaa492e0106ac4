"""Publish: push the finished output folder to a Hub model repo in one commit.

The token is checked before any merge work (a missing token, or one that cannot write to the target
namespace or repo, fine-grained scopes included, fails in a second, not after the merge). Uploads go through `huggingface_hub`, so the stored
login, `HF_TOKEN`, Xet and LFS all behave as with `hf upload`. Identical content makes no new commit.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PublishError
from .lock import LOCK_FILE, RECIPE_COPY
from .plan import MergePlan
from .sources import LICENSE_FILES, TOKENIZER_FILES

__all__ = ["PushResult", "check_push_access", "push"]


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


def check_push_access(plan: MergePlan) -> str:
    """Fail early unless a token that can write to the target namespace is available; return the user name."""
    import os

    from huggingface_hub import HfApi, get_token

    repo = plan.recipe.output.repo
    assert repo is not None
    try:
        token = get_token()
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
        who: dict[str, Any] = HfApi().whoami()
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


def push(plan: MergePlan, folder: Path) -> PushResult:
    """Create the repo if needed and upload `folder` to its branch or as a pull request.

    The commit names the branch tip it was computed against (deletions included); when someone else
    pushes in between, the Hub refuses it (412 or 409) and the push is redone on the new tip.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    out = plan.recipe.output
    repo = out.repo
    assert repo is not None
    api = HfApi()
    branch = out.branch or "main"
    try:
        api.create_repo(repo, private=out.private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo, branch=branch, exist_ok=True)
        attempt = 1
        while True:
            try:
                return _push_once(api, plan, folder, repo, branch)
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


def _push_once(api: Any, plan: MergePlan, folder: Path, repo: str, branch: str) -> PushResult:
    from huggingface_hub.errors import RevisionNotFoundError

    out = plan.recipe.output
    try:
        before = api.repo_info(repo, revision=branch).sha
    except RevisionNotFoundError:
        before = None
    info = api.upload_folder(
        repo_id=repo,
        folder_path=folder,
        revision=branch,
        commit_message=f"hubmerge: {plan.recipe.path.name} ({plan.recipe.method.name})",
        commit_description=_commit_description(plan),
        create_pr=out.create_pr,
        parent_commit=None if out.create_pr else before,
        delete_patterns=_managed_files(api, repo, before or branch),
    )
    if info.pr_url:
        return PushResult(info.pr_url, True)
    return PushResult(info.commit_url, info.oid != before)
