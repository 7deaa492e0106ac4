"""The Hub's rules as the local Hub enforces them (names, paths, write access) and the request formats
it parses (ndjson commits, byte ranges, README front matter)."""

from __future__ import annotations

import json
from typing import Any

from .http import HubError
from .storage import _FRONT_MATTER_RE, _NAME_RE, _User


def _can_write(user: _User | None, namespace: str, repo_id: str | None = None) -> bool:
    if user is None or not (namespace == user.name or namespace in user.orgs):
        return False
    if user.scoped is None:
        return True
    return any("repo.write" in user.scoped.get(entity, ()) for entity in (namespace, repo_id) if entity)


def _valid_repo_name(name: str) -> bool:
    """The Hub's naming rules, which the client also enforces before sending anything."""
    return (
        _NAME_RE.fullmatch(name) is not None
        and "--" not in name
        and ".." not in name
        and name[0] not in "-."
        and name[-1] not in "-."
        and not name.endswith(".git")
    )


def _list_of_objects(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise HubError(400, "Expected a list of objects")
    return value


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_ref_name(name: str) -> bool:
    return not any(bad in name for bad in ("..", "~", "^", ":", "\\", " ", "?", "*", "[", "//")) and not (
        name.startswith("/") or name.endswith(("/", ".lock"))
    )


def _check_path(path: Any) -> str:
    if (
        not isinstance(path, str)
        or not path
        or path.startswith("/")
        or any(part in ("", ".", "..") for part in path.rstrip("/").split("/"))
    ):
        raise HubError(400, f"Invalid path in commit: {path!r}")
    return path


def _parse_ndjson(body: bytes) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """Split a commit payload into its header value and its (key, value) operations."""
    items = []
    for line in body.splitlines():
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as err:
            raise HubError(400, f"Malformed ndjson line: {err}") from err
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("key"), str)
            or not isinstance(item.get("value"), dict)
        ):
            raise HubError(400, "Each ndjson line must be {'key': str, 'value': object}")
        items.append((item["key"], item["value"]))
    if not items or items[0][0] != "header":
        raise HubError(400, "The first ndjson line must be the header")
    return items[0][1], items[1:]


def _range_start(header: str | None) -> int:
    """The first byte a `bytes=N-M` Range header asks for; -1 without one (or for a suffix range)."""
    if header is None or not header.startswith("bytes="):
        return -1
    first = header.removeprefix("bytes=").partition("-")[0].strip()
    return int(first) if first.isdigit() else -1


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `bytes=` range; None to send the whole body (no or multiple ranges)."""
    if header is None or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header.removeprefix("bytes=").strip().partition("-")
    try:
        if first == "":
            start, end = max(size - int(last), 0), size - 1  # suffix range: the last N bytes
        else:
            start, end = int(first), min(int(last), size - 1) if last else size - 1
    except ValueError:
        return None
    if start >= size or start > end:
        raise HubError(416, f"Range {header} not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, end


def _parse_front_matter(text: str) -> dict[str, Any] | None:
    """The README's YAML metadata; None without front matter or without PyYAML (then nothing is checked)."""
    match = _FRONT_MATTER_RE.match(text)
    if match is None:
        return None
    try:
        import yaml
    except ImportError:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        raise ValueError(f"Invalid YAML in the metadata block: {err}") from err
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError("The metadata block must be a YAML mapping")
    return data
