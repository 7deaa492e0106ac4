"""The recipe form: method, base, models and `[parameters]`, its fields taken from the method registry, read
from the TOML and written back into it (only the lines the form owns change; comments and other tables stay).

A value the form cannot show (a gradient or filter, a `[[models]]` table) is left to the TOML: `read_form`
reports it as not editable, and `write_form` leaves those lines as they are.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any

from ..merging.methods import METHODS, Method, Param
from ..recipe.write import toml_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["FIELDS", "Form", "fields_of", "read_form", "write_form"]


def _collect() -> dict[str, Param]:
    fields: dict[str, Param] = {}
    for method in METHODS.values():
        for param in (*method.params, *method.model_params):
            fields.setdefault(param.name, param)
    return fields


# Every parameter name of every method, declared once each (a name means the same in every method that has it).
FIELDS: dict[str, Param] = _collect()


def fields_of(method: Method) -> list[Param]:
    """The method's `[parameters]`: its global ones, then the per-model ones (there: every model's default)."""
    return [*method.params, *method.model_params]


@dataclass(frozen=True)
class Form:
    method: str | None
    base: str
    models: list[str] | None  # None: `[[models]]` tables or entries with settings, edited in the TOML
    parameters: dict[str, Any] = field(default_factory=dict)  # as written; a list or table is a schedule


def read_form(text: str) -> Form | None:
    """What the form shows of the recipe `text`; None when it is not TOML."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return None
    method = data.get("method")
    base = data.get("base")
    models = data.get("models", [])
    listed = isinstance(models, list) and all(isinstance(m, str) for m in models) and "[[models]]" not in text
    parameters = data.get("parameters")
    return Form(
        method if isinstance(method, str) and method in METHODS else None,
        base if isinstance(base, str) else "",
        list(models) if listed else None,
        dict(parameters) if isinstance(parameters, dict) else {},
    )


_HEADER = re.compile(r"^\s*\[")


def _key(line: str) -> str | None:
    match = re.match(r'^\s*("?)([A-Za-z0-9_-]+)\1\s*=', line)
    return match.group(2) if match else None


def _span(lines: list[str], start: int) -> int:
    """The index after the value that starts on `lines[start]` (a multi-line array ends at its bracket)."""
    depth, end = 0, start
    while end < len(lines):
        depth += lines[end].split("#")[0].count("[") - lines[end].split("#")[0].count("]")
        end += 1
        if depth <= 0:
            break
    return end


def _set(lines: list[str], start: int, stop: int, key: str, value: str | None) -> list[str]:
    """`key = value` in lines[start:stop] (replaced, or added at its end); removed when `value` is None."""
    for i in range(start, stop):
        if _key(lines[i]) == key:
            end = _span(lines, i)
            return lines[:i] + ([f"{key} = {value}"] if value is not None else []) + lines[end:]
    if value is None:
        return lines
    at = stop
    while at > start and not lines[at - 1].strip():
        at -= 1  # after the last line of the table, before the blank lines that end it
    return [*lines[:at], f"{key} = {value}", *lines[at:]]


def _top(lines: list[str]) -> int:
    return next((i for i, line in enumerate(lines) if _HEADER.match(line)), len(lines))


def write_form(text: str, method: str, base: str, models: list[str] | None, values: dict[str, Any]) -> str:
    """The recipe `text` with the form's method, base, models and `[parameters]` values written into it.

    A parameter equal to its default is written only when the recipe already sets it; one the method does not
    have is left to the validation to point out; a `None` value (a schedule the form cannot show) is left as
    written."""
    lines = text.splitlines()
    lines = _set(lines, 0, _top(lines), "method", toml_value(method))
    lines = _set(lines, 0, _top(lines), "base", toml_value(base.strip()) if base.strip() else None)
    if models is not None:
        lines = _set(lines, 0, _top(lines), "models", toml_value([m.strip() for m in models if m.strip()]))
    start = next((i for i, line in enumerate(lines) if re.match(r"^\s*\[\s*parameters\s*\]", line)), None)
    params = fields_of(METHODS[method])
    present = read_form(text)
    given = present.parameters if present is not None else {}
    wanted = {
        p.name: values[p.name]
        for p in params
        if p.name in values
        and values[p.name] is not None
        and (p.name in given or values[p.name] != p.default)
    }
    if start is None:
        if not wanted:
            return "\n".join(lines) + "\n"
        lines = [*lines, "", "[parameters]"] if lines and lines[-1].strip() else [*lines, "[parameters]"]
        start = len(lines) - 1
    for name, value in wanted.items():
        stop = next((i for i in range(start + 1, len(lines)) if _HEADER.match(lines[i])), len(lines))
        lines = _set(lines, start + 1, stop, name, toml_value(value))
    return "\n".join(lines) + "\n"
