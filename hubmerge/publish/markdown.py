"""Untrusted strings made inert for the Markdown they land in: the model card and the job summary.

A source's card metadata, its config.json, a local folder's name and a recipe's strings are written by
someone else. Whatever they hold, once escaped here they render as the same visible text: no HTML tag, no
link or image, no table cell, no heading or list, no line break and no bidirectional-text override comes
out of them. `Markdown` marks a string hubmerge built from escaped parts; the card template escapes every
other string it prints (`finalize`).
"""

from __future__ import annotations

import json
import re

__all__ = ["Markdown", "code", "finalize", "literal", "safe_url", "text", "visible"]


class Markdown(str):
    """Markdown hubmerge composed from escaped parts: printed as it is."""


# Bidirectional overrides and isolates (they reorder what a reader sees) and the other invisible controls.
_INVISIBLE = re.compile(
    "[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]"
)
# `_` between letters or digits starts no emphasis, `!` no image once `[` is escaped, `#` a heading only at a line's start.
_SPECIAL = re.compile(r"([\\`*\[\]<>|~]|(?<![^\W_])_|_(?![^\W_]))")
# What would open a block at the start of a line: a heading, a list item ("1." escaped after its digits), a rule.
_BLOCK_START = re.compile(r"^(\d{0,9})([#+\-=]|(?<=\d)[.)](?=\s|$))")
_URL = re.compile(r"https?://[A-Za-z0-9.-]+(?::\d+)?(?:/[^\s<>()\[\]`\"'\\|]*)?")
_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _plain(value: object) -> str:
    """One line of visible characters: whitespace runs (newlines included) become one space."""
    return " ".join(_INVISIBLE.sub("", str(value)).split())


def text(value: object) -> Markdown:
    """`value` as inline text: every character shows as itself, none starts markup (a table cell, a link, an
    HTML tag or entity, emphasis, or at the start of a line a heading, list or rule)."""
    escaped = _SPECIAL.sub(r"\\\1", _plain(value).replace("&", "&amp;"))
    return Markdown(_BLOCK_START.sub(r"\1\\\2", escaped))


def code(value: object) -> Markdown:
    """`value` in a code span (HTML is inert there) that no backtick can close and no `|` can split."""
    inside = _plain(value).replace("`", "'").replace("|", "\\|") or " "
    return Markdown(f"`{inside}`")


def literal(value: object) -> Markdown:
    """`value` as a Python string literal, for a fenced code block: no quote, newline or backtick in it."""
    return Markdown(json.dumps(_INVISIBLE.sub("", str(value))).replace("`", "\\u0060"))


def visible(block: str) -> Markdown:
    """`block` for a fenced code block (whose fence is longer than any backtick run in it), with every
    invisible control shown as its code point: a bidirectional override cannot reorder what a reader sees."""
    return Markdown(_INVISIBLE.sub(lambda m: f"<U+{ord(m.group()):04X}>", block))


def safe_url(value: object) -> Markdown | None:
    """`value` when it is an http(s) URL or a file name that can stand as a link target as it is; else None
    (`javascript:`, whitespace, parentheses or angle brackets)."""
    if isinstance(value, str) and (_URL.fullmatch(value) or _FILE.fullmatch(value)):
        return Markdown(value)
    return None


def finalize(value: object) -> object:
    """The card template's `finalize`: `Markdown` and numbers are printed as they are, anything else (a
    string, a list, a mapping) as `text`."""
    if isinstance(value, Markdown | int | float) or value is None:
        return value
    return text(value)
