"""Publish: push the finished output folder to a Hub model repo in one commit.

The token is checked before any merge work (a missing token, or one that cannot write to the target
namespace, fails in a second, not after the merge). Uploads go through `huggingface_hub`, so the stored
login, `HF_TOKEN`, Xet and LFS all behave as with `hf upload`. Identical content makes no new commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PublishError
from .plan import MergePlan

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
    role = who.get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":
        raise PublishError(
            "the token is read-only; create a write token at /settings/tokens and set HF_TOKEN"
        )
    return str(who.get("name"))


def _commit_description(plan: MergePlan) -> str:
    lines = [f"Merged with hubmerge, method `{plan.recipe.method.name}`.", ""]
    for source in plan.weight_sources:
        pinned = f" @ {source.sha}" if source.sha else ""
        lines.append(f"- {source.label}{pinned}")
    return "\n".join(lines)


def push(plan: MergePlan, folder: Path) -> PushResult:
    """Create the repo if needed and upload `folder` to its branch or as a pull request."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RevisionNotFoundError

    out = plan.recipe.output
    repo = out.repo
    assert repo is not None
    api = HfApi()
    branch = out.branch or "main"
    try:
        api.create_repo(repo, private=out.private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo, branch=branch, exist_ok=True)
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
            # A new merge may have fewer shards than the last one: stale weights must not linger.
            delete_patterns=["*.safetensors", "model.safetensors.index.json"],
        )
    except PublishError:
        raise
    except Exception as exc:
        raise _hub_failure(repo, exc) from None
    if info.pr_url:
        return PushResult(info.pr_url, True)
    return PushResult(info.commit_url, info.oid != before)
