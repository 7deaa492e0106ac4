"""The local Hub's request log and fault injection: errors, dropped and cut connections, held requests,
tampered bytes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import unquote

from .rules import _range_start


class RequestRecord(NamedTuple):
    """One served request: `path` is percent-decoded without the query, `range` is the Range header."""

    method: str
    path: str
    status: int
    body_bytes: int
    range: str | None


@dataclass
class _Fault:
    remaining: int
    status: int | None  # None: close the connection without answering
    path_contains: str | None
    method: str | None
    cut: bool = False  # answer normally but close the connection halfway through the body
    whole: bool = False  # only requests without a Range header (a download, not a header probe)
    from_byte: int | None = None  # only requests for a range starting at this byte or later


@dataclass
class Hold:
    """A request held before it is answered: `arrived` is set when it comes in, and the answer waits
    for `release`, so a test can act while a client is provably mid-request (a slow Hub, as seen by it)."""

    path_contains: str
    method: str | None
    whole: bool  # only requests without a Range header (a download, not a header probe)
    from_byte: int | None = None  # only requests for a range starting at this byte or later
    arrived: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


class _Faults:
    """The request log and the faults a test injects (a mixin of `LocalHub`)."""

    # ------------------------------------------------------------------ request log and faults

    def bytes_served(
        self, match: Callable[[str], bool], *, include_ranges: bool = True, since: int = 0
    ) -> int:
        """Body bytes sent by GETs whose decoded path satisfies `match`, from `requests[since]` on.

        With `include_ranges=False`, requests that carried a `Range` header are left out, so a test can allow
        safetensors header probes while asserting that no whole file was downloaded.
        """
        with self._lock:
            return sum(
                record.body_bytes
                for record in self.requests[since:]
                if record.method == "GET" and match(record.path) and (include_ranges or record.range is None)
            )

    def fail_next(
        self,
        n: int,
        status: int = 500,
        path_contains: str | None = None,
        method: str | None = None,
        from_byte: int | None = None,
    ) -> None:
        """Answer `status` to the next `n` requests whose target (raw or decoded) contains `path_contains`.

        None matches any target; `method` (e.g. "GET") narrows the match, since a download is a HEAD then a
        GET on the same path and the client retries them differently. With `from_byte`, only requests for a
        range starting at that byte or later match (a read of tensor data, not of a header).
        """
        with self._lock:
            self._faults.append(_Fault(n, status, path_contains, method, from_byte=from_byte))

    def drop_next(
        self,
        n: int,
        path_contains: str | None = None,
        method: str | None = None,
        from_byte: int | None = None,
    ) -> None:
        """Close the connection without an answer on the next `n` matching requests (see `fail_next`)."""
        with self._lock:
            self._faults.append(_Fault(n, None, path_contains, method, from_byte=from_byte))

    def cut_next(
        self,
        n: int,
        path_contains: str,
        method: str | None = None,
        whole: bool = False,
        from_byte: int | None = None,
    ) -> None:
        """Send the headers and half the body of the next `n` matching answers, then close the connection;
        with `whole`, only requests without a Range header match (`from_byte`: see `fail_next`)."""
        with self._lock:
            self._faults.append(
                _Fault(n, None, path_contains, method, cut=True, whole=whole, from_byte=from_byte)
            )

    def hold_next(
        self, path_contains: str, method: str | None = None, whole: bool = False, from_byte: int | None = None
    ) -> Hold:
        """Hold the next matching request until the returned `Hold` is released (see `Hold`); with `whole`,
        only a request without a Range header matches (`from_byte`: see `fail_next`)."""
        hold = Hold(path_contains, method, whole, from_byte)
        with self._lock:
            self._holds.append(hold)
        return hold

    def tamper(self, repo_id: str, path: str, answer: Callable[[int, int, bytes], bytes]) -> None:
        """Answer every byte-range GET of `path` in `repo_id` with `answer(start, end, content)` (end
        inclusive) instead of `content[start : end + 1]`, keeping the status, headers and length: a Hub whose
        ranges lie while its metadata (sizes, LFS sha256, whole downloads) stays right."""
        with self._lock:
            self._tampers[(repo_id, path)] = answer

    def _take_hold(
        self, method: str, target: str, ranged: bool, range_header: str | None = None
    ) -> Hold | None:
        with self._lock:
            for hold in self._holds:
                if (
                    hold.method in (None, method)
                    and not (hold.whole and ranged)
                    and (hold.from_byte is None or _range_start(range_header) >= hold.from_byte)
                    and (hold.path_contains in target or hold.path_contains in unquote(target))
                ):
                    self._holds.remove(hold)
                    return hold
        return None
