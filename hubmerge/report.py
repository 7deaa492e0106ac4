"""Human and machine renderings of a plan and of a finished merge (terminal text, JSON, Markdown)."""

from __future__ import annotations

import re
from typing import Any

from . import __version__
from .budget import format_size
from .plan import MergePlan

__all__ = ["plan_json", "plan_text", "summary_markdown"]


_gb = format_size


def plan_json(plan: MergePlan) -> dict[str, Any]:
    r = plan.recipe
    return {
        "hubmerge_version": __version__,
        "recipe": str(r.path),
        "recipe_sha256": r.sha256,
        "method": r.method.name,
        "parameters": dict(r.parameters),
        "sources": [
            {
                "role": role.name,
                "reference": role.ref.text,
                "repo_id": role.ref.repo_id,
                "revision": role.ref.revision,
                "sha": role.source.sha,
                "path": str(role.ref.path) if role.ref.path else None,
                "parameters": dict(role.params),
            }
            for role in plan.roles
        ],
        "downloads": [
            {
                "source": d.role,
                "reference": d.reference,
                "local": d.local,
                "files": list(d.files),
                "bytes": d.bytes,
                "cached_bytes": d.cached_bytes,
            }
            for d in plan.downloads
        ],
        "output": {
            "dir": str(r.output.dir),
            "dtype": str(plan.out_dtype).removeprefix("torch."),
            "tensors": len(plan.tensors),
            "parameters": plan.parameter_count,
            "bytes": plan.output_bytes,
            "shards": [s.file for s in plan.shards],
            "tie_word_embeddings": plan.tie_word_embeddings,
        },
        "estimates": {
            "peak_memory_bytes": plan.disk.peak_memory,
            "disk_bytes": plan.disk.peak_disk,
            "network_bytes": plan.disk.network_bytes,
        },
        "disk": _disk_json(plan),
        "push": None
        if r.output.repo is None
        else {
            "repo": r.output.repo,
            "private": r.output.private,
            "branch": r.output.branch,
            "create_pr": r.output.create_pr,
        },
        "warnings": list(plan.warnings),
    }


def _disk_json(plan: MergePlan) -> dict[str, Any]:
    d = plan.disk
    return {
        "strategy": d.strategy,
        "budget_bytes": d.budget,
        "budget_origin": d.budget_origin,
        "output_budget_bytes": d.output_budget,
        "peak_disk_bytes": d.peak_disk,
        "peak_memory_bytes": d.peak_memory,
        "network_bytes": d.network_bytes,
        "reads": d.reads,
        "output_disk_bytes": d.output_disk,
        "scratch_bytes": d.scratch_bytes,
        "max_shard_size": d.max_shard_size,
        "upload_while_merging": d.upload_while_merging,
        "sources": [
            {
                "source": s.role,
                "strategy": s.strategy,
                "disk_bytes": s.disk_bytes,
                "network_bytes": s.network_bytes,
                "reason": s.reason,
            }
            for s in d.sources
        ],
    }


def plan_text(plan: MergePlan) -> str:
    data = plan_json(plan)
    lines = [f"recipe   {data['recipe']}", f"method   {data['method']} {data['parameters'] or ''}".rstrip()]
    for s in data["sources"]:
        pinned = f" @ {s['sha']}" if s["sha"] else ""
        params = f" {s['parameters']}" if s["parameters"] and s["parameters"] != {"weight": 1.0} else ""
        lines.append(f"{s['role'] + ' ':<9}{s['repo_id'] or s['path']}{pinned}{params}")  # models[10] too
    streamed = plan.disk.streamed
    for d in data["downloads"]:
        files = f"{d['source']} ({d['reference']}): {len(d['files'])} files, {_gb(d['bytes'])}"
        lines.append(
            f"local    {files} read in place"
            if d["local"]
            else f"download {files} ({_gb(d['cached_bytes'])} cached"
            + ("; the weights are streamed, not downloaded)" if d["source"] in streamed else ")")
        )
    out = data["output"]
    lines.append(
        f"output   {out['dir']}: {out['tensors']} tensors, {out['parameters']:,} parameters, {out['dtype']}, "
        f"{_gb(out['bytes'])} in {len(out['shards'])} file(s), "
        f"{'tied' if out['tie_word_embeddings'] else 'untied'} lm_head"
    )
    disk = data["disk"]
    lines.append(
        f"needs    ~{_gb(disk['peak_memory_bytes'])} peak memory, {_gb(disk['peak_disk_bytes'])} disk of a "
        f"{_gb(disk['budget_bytes'])} budget ({disk['budget_origin']}), {_gb(disk['network_bytes'])} over the network"
    )
    lines += [
        f"{'stream' if s['strategy'] == 'streaming' else s['strategy']:<9}{s['source']}: {s['reason']}"
        + (f", {_gb(s['network_bytes'])} over the network" if s["network_bytes"] else "")
        for s in disk["sources"]
        if s["strategy"] != "local"
    ]
    if disk["upload_while_merging"]:
        lines.append(
            f"upload   each shard (at most {_gb(disk['max_shard_size'])}) as it is written; the output folder "
            f"holds about {_gb(disk['output_disk_bytes'])} at once"
        )
    push = data["push"]
    lines.append(
        "push     none ([output] repo not set)"
        if push is None
        else f"push     {push['repo']} ({'pull request' if push['create_pr'] else push['branch'] or 'main'}"
        f"{', private' if push['private'] else ''}): the output folder"
    )
    lines += [f"warning  {w}" for w in data["warnings"]]
    return "\n".join(lines)


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|!~])")


def _md(value: object) -> str:
    """`value` as inert Markdown text for a job summary: Hub metadata and recipe strings are untrusted, so no
    markup, link, HTML tag, table cell or line break can come out of them."""
    text = " ".join(str(value).split())
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text.replace("&", "&amp;"))


def _code(value: object) -> str:
    """`value` in a code span (where HTML is inert) that no backtick can close and no `|` can split."""
    text = " ".join(str(value).split()).replace("`", "'").replace("|", "\\|")
    return f"`{text}`"


def summary_markdown(plan: MergePlan, commit_url: str | None = None, merged: bool = False) -> str:
    data = plan_json(plan)
    title = "Merged" if merged else "Plan for"
    lines = [
        f"### {title} {_code(plan.recipe.path.name)} ({_md(data['method'])})",
        "",
        "| role | source | revision | sha |",
        "|---|---|---|---|",
    ]
    for s in data["sources"]:
        lines.append(
            f"| {s['role']} | {_code(s['repo_id'] or s['path'])} | {_md(s['revision'] or '')} "
            f"| {_code(s['sha'] or 'local')} |"
        )
    out = data["output"]
    lines += [
        "",
        f"Output: {out['tensors']} tensors, {out['parameters']:,} parameters, {_gb(out['bytes'])} ({_md(out['dtype'])}).",
    ]
    if commit_url:
        lines.append(f"Pushed: {_md(commit_url)}")
    lines += [f"> warning: {_md(w)}" for w in data["warnings"]]
    return "\n".join(lines) + "\n"
