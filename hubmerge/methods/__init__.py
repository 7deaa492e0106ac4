"""The merge methods: one module each, registered here by name.

A method is one `Method` value (`base.py`): its parameters, its input contract, the statistics it
gathers before merging, its merge step, and what the card and the README say of it. The engine, the
recipe validator, the card and the README table all read this registry; adding a method is one file
here plus its tests.
"""

from __future__ import annotations

from . import linear, nearswap, passthrough, sce, simple_average, task_arithmetic, ties
from .base import Contract, Method, Param, Reduce, Select, Slice, Stats, uniform
from .ties import TiesChunk, ties_keep_count

__all__ = [
    "METHODS",
    "Contract",
    "Method",
    "Param",
    "Reduce",
    "Select",
    "Slice",
    "Stats",
    "TiesChunk",
    "get_method",
    "readme_table",
    "ties_keep_count",
    "uniform",
]

METHODS: dict[str, Method] = {
    m.METHOD.name: m.METHOD
    for m in (
        simple_average,
        linear,
        task_arithmetic,
        ties,
        nearswap,
        passthrough,
        sce,
    )
}


def get_method(name: str) -> Method:
    return METHODS[name]


def _default(value: object) -> str:
    return "required" if value is None else repr(value).lower() if isinstance(value, bool) else repr(value)


def readme_table() -> str:
    """The README's method table, generated from the registry (tests/test_readme.py keeps them equal)."""
    lines = [
        "| method | formula | inputs | parameters (default) | per-model parameters (default) | paper | same math as |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in METHODS.values():
        params = ", ".join(f"`{p.name}` ({_default(p.default)})" for p in m.params) or "—"
        model_params = ", ".join(f"`{p.name}` ({_default(p.default)})" for p in m.model_params) or "—"
        paper = f"[{m.paper}](https://arxiv.org/abs/{m.paper.removeprefix('arXiv:')})" if m.paper else "—"
        same = (
            ", ".join(
                x
                for x in (
                    m.mergekit and f"mergekit `{m.mergekit}`",
                    m.fusionbench and f"FusionBench `{m.fusionbench}`",
                )
                if x
            )
            or "—"
        )
        lines.append(
            f"| `{m.name}` | {m.formula} | {m.contract.describe()} | {params} | {model_params} | {paper} | {same} |"
        )
    return "\n".join(lines) + "\n"
