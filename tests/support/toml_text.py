"""TOML text written by the tests themselves, independently of hubmerge's own writer."""

from __future__ import annotations

import json
import re
from typing import Any


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # repr spells nan, inf, -inf, 1e-300 as TOML does
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string, control characters escaped
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
