"""Recipe TOML that hubmerge writes (the mergekit importer, a search's best.toml, the web app's form).

tomli-w writes every key and scalar, so its escapes and number text are what `tomllib` reads back. A
recipe laid out by hand, with a comment beside each line (the importer) or edited line by line (the form),
needs a value on one line, which tomli-w's documents do not promise for lists and tables: `toml_value`
joins those inline around tomli-w's scalars.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import tomli_w

__all__ = ["toml_document", "toml_key", "toml_value"]


def toml_key(key: str) -> str:
    """`key` as a TOML key: bare where TOML allows it, else quoted."""
    return tomli_w.dumps({key: 0}).rsplit(" = ", 1)[0]


def toml_value(value: Any) -> str:
    """A scalar, list or table as one line of TOML (lists and tables inline)."""
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value!r} has no place in a recipe")  # the schema refuses it earlier
    return tomli_w.dumps({"v": value}).removeprefix("v = ").removesuffix("\n")


def toml_document(document: Mapping[str, Any], header: str = "") -> str:
    """`document` as a TOML file, `header` as its opening comment lines."""
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    return comment + tomli_w.dumps(document)
