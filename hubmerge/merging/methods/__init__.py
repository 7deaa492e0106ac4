"""The merge methods: one module each, registered here by name.

A method is one `Method` value (`base.py`): its parameters, its input contract, the statistics it
gathers before merging, its merge step, and what the card and the documentation say of it. The engine,
the recipe validator, the card and the documentation (`hubmerge.docs_gen`: the methods table, one page per
method) all read this registry; adding a method is one file here plus its tests.
"""

from __future__ import annotations

from collections.abc import Callable

from . import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    karcher,
    linear,
    mergekit_ties,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    sce,
    simple_average,
    slerp,
    task_arithmetic,
    ties,
)
from .base import (
    Contract,
    Deferral,
    Deferred,
    Method,
    Param,
    Reduce,
    Select,
    Slice,
    Stats,
    resolve_defaults,
    trim_,
    uniform,
)
from .ties import ties_keep_count

__all__ = [
    "METHODS",
    "TABLE_END",
    "TABLE_START",
    "Contract",
    "Deferral",
    "Deferred",
    "Method",
    "Param",
    "Reduce",
    "Select",
    "Slice",
    "Stats",
    "get_method",
    "methods_table",
    "ties_keep_count",
    "trim_",
    "uniform",
]

METHODS: dict[str, Method] = {
    m.METHOD.name: m.METHOD
    for m in (
        simple_average,
        linear,
        task_arithmetic,
        ties,
        mergekit_ties,
        dare_ties,
        dare_linear,
        breadcrumbs,
        breadcrumbs_ties,
        della,
        della_linear,
        slerp,
        nuslerp,
        multislerp,
        karcher,
        model_stock,
        nearswap,
        passthrough,
        sce,
    )
}


def get_method(name: str) -> Method:
    return METHODS[name]


# The methods table sits between these markers in docs/methods/index.md (`python -m hubmerge.docs_gen`).
TABLE_START = "<!-- methods:start -->"
TABLE_END = "<!-- methods:end -->"


def _value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, str) else repr(value)


def _number(value: float) -> str:
    return f"{value:g}"


def _param(p: Param) -> str:
    """`name` (default; allowed values; scope), as the methods table lists a parameter."""
    facts = ["required" if p.default is None else _value(p.default)]
    if p.choices:
        facts.append(" or ".join(_value(c) for c in p.choices))
    if p.minimum is not None and p.maximum is not None:
        facts.append(f"{_number(p.minimum)} to {_number(p.maximum)}")
    elif p.minimum is not None:
        facts.append(f"≥ {_number(p.minimum)}")
    elif p.maximum is not None:
        facts.append(f"≤ {_number(p.maximum)}")
    if not p.per_tensor:
        facts.append("one value for the model")
    return f"`{p.name}` ({'; '.join(facts)})"


def _paper(m: Method) -> str:
    if m.paper is None:
        return "—"
    arxiv = m.paper.removeprefix("arXiv:")
    return f"[{m.citation.cite if m.citation else m.paper}](https://arxiv.org/abs/{arxiv})"


def _reads(m: Method) -> str:
    at_defaults = m.reads(resolve_defaults(m.params, {}), [resolve_defaults(m.model_params, {})])
    return str(at_defaults) if m.max_reads() == at_defaults else f"{at_defaults} to {m.max_reads()}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def methods_table(link: Callable[[str], str] | None = None) -> str:
    """The methods table and the notes under it, generated from the registry; `link(name)`, when given, is
    the address each method's name links to (its page)."""
    lines = [
        "| method | formula | inputs | parameters (default; allowed) | per-model parameters (default; allowed) "
        "| paper | same math as | reads of the inputs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in METHODS.values():
        same = [f"mergekit `{m.mergekit}`"] if m.mergekit else []
        same += [f"FusionBench `{m.fusionbench}`"] if m.fusionbench else []
        cells = [
            f"[`{m.name}`]({link(m.name)})" if link else f"`{m.name}`",
            m.formula,
            m.contract.describe(),
            ", ".join(map(_param, m.params)) or "—",
            ", ".join(map(_param, m.model_params)) or "—",
            _paper(m),
            ", ".join(same) or "—",
            _reads(m),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines.append("")
    for m in METHODS.values():
        text = " ".join(t for t in (m.description, m.notes) if t)
        if text:
            lines.append(f"- **`{m.name}`** ({m.title}): {text}")
    return "\n".join(lines) + "\n"
