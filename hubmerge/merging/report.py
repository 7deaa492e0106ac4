"""Human and machine renderings of a plan and of a finished merge (terminal text, JSON, Markdown)."""

from __future__ import annotations

import difflib
from typing import Any

from .. import __version__
from ..errors import RecipeError
from ..publish.markdown import code, text
from ..sources.budget import format_size
from .methods.base import Pass, Reduce
from .plan import MergePlan
from .schedule import to_json

__all__ = ["explain", "plan_json", "plan_text", "summary_markdown"]


_gb = format_size


def _pass_json(p: Pass, plan: MergePlan) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": p.name, "kind": type(p).__name__.lower(), "scope": p.scope}
    if isinstance(p, Reduce) and p.shapes is not None:  # a pass limited to some shapes reads only those
        entry["tensors"] = sum(1 for t in plan.tensors if p.shapes(t.shape))
    return entry


def plan_json(plan: MergePlan) -> dict[str, Any]:
    r = plan.recipe
    return {
        "hubmerge_version": __version__,
        "recipe": str(r.path),
        "recipe_sha256": r.sha256,
        "method": r.method.name,
        "parameters": {k: to_json(v) for k, v in r.parameters.items()},
        # Statistics gathered before merging, and how many times every input byte is read in all.
        "passes": [_pass_json(p, plan) for p in plan.passes],
        "reads": 1 + len(plan.passes),
        "sources": [
            {
                "role": role.name,
                "reference": role.ref.text,
                "repo_id": role.ref.repo_id,
                "revision": role.ref.revision,
                "sha": role.source.sha,
                "path": str(role.ref.path) if role.ref.path else None,
                "parameters": {k: to_json(v) for k, v in role.params.items()},
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
        "settle_first": d.settle_first,
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
    if data["passes"]:
        passes = ", ".join(
            f"{p['name']} ({p['kind']} over each {p['scope']}"
            + (f", {p['tensors']} of {len(plan.tensors)} tensors)" if "tensors" in p else ")")
            for p in data["passes"]
        )
        at_most = "at most " if any("tensors" in p for p in data["passes"]) else ""
        lines.append(f"passes   {passes}: every input is read {at_most}{data['reads']} times")
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
            + (
                f"; the {plan.recipe.method.settle.name} pass settles first what would otherwise rewrite "
                "uploaded shards"
                if disk["settle_first"] and plan.recipe.method.settle
                else ""
            )
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


def summary_markdown(plan: MergePlan, commit_url: str | None = None, merged: bool = False) -> str:
    data = plan_json(plan)
    title = "Merged" if merged else "Plan for"
    lines = [
        f"### {title} {code(plan.recipe.path.name)} ({text(data['method'])})",
        "",
        "| role | source | revision | sha |",
        "|---|---|---|---|",
    ]
    for s in data["sources"]:
        lines.append(
            f"| {s['role']} | {code(s['repo_id'] or s['path'])} | {text(s['revision'] or '')} "
            f"| {code(s['sha'] or 'local')} |"
        )
    out = data["output"]
    lines += [
        "",
        f"Output: {out['tensors']} tensors, {out['parameters']:,} parameters, {_gb(out['bytes'])} ({text(out['dtype'])}).",
    ]
    if commit_url:
        lines.append(f"Pushed: {text(commit_url)}")
    lines += [f"> warning: {text(w)}" for w in data["warnings"]]
    return "\n".join(lines) + "\n"


def explain(plan: MergePlan, name: str) -> str:
    """Parameter `name` as resolved for every output tensor (gradients and filters evaluated): one line per
    tensor, the global value or one value per model. Raises `RecipeError` for a parameter the method lacks."""
    method = plan.recipe.method
    known = [p.name for p in method.params + method.model_params]
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = (
            f"did you mean {close[0]!r}?" if close else f"{method.name} takes: {', '.join(known) or 'none'}"
        )
        raise RecipeError(f"--explain {name}: {method.name} has no parameter {name!r}; {hint}")
    per_model = name not in {p.name for p in method.params}
    header = [role.name for role in plan.model_roles] if per_model else [name]
    rows = [
        [_value(v) for v in ([m[name] for m in t.model_params] if per_model else [t.params[name]])]
        for t in plan.tensors
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    first = max(len(t.name) for t in plan.tensors)
    table = [["tensor", *header]] + [[t.name, *row] for t, row in zip(plan.tensors, rows, strict=True)]
    lines = [
        "  ".join(f"{c:<{w}}" for c, w in zip(row, [first, *widths], strict=True)).rstrip() for row in table
    ]
    return "\n".join(lines)


def _value(v: object) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)
