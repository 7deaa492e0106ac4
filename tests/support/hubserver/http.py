"""The local Hub's HTTP side: requests and answers, the threaded server and its handler."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from .storage import DiskFile

if TYPE_CHECKING:
    from .hub import LocalHub


class HubError(Exception):
    """An HTTP error answer, with the `X-Error-Code` the client maps to an exception class."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


@dataclass
class _Request:
    method: str
    target: str  # raw request target, query included
    path: str  # percent-decoded, no query
    segments: list[str]  # split on "/" first, then percent-decoded, so "refs%2Fpr%2F1" stays one segment
    query: dict[str, list[str]]
    headers: Message  # case-insensitive lookups
    body: bytes

    def flag(self, name: str) -> bool:
        return self.query.get(name, [""])[-1].lower() in ("1", "true")

    def json(self) -> dict[str, Any]:
        if not self.body.strip():
            return {}
        try:
            payload = json.loads(self.body)
        except ValueError as err:
            raise HubError(400, f"Malformed JSON body: {err}") from err
        if not isinstance(payload, dict):
            raise HubError(400, "The JSON body must be an object")
        return payload


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    cut: bool = False  # send half the body, then drop the connection


def _json_response(payload: Any, status: int = 200, content_type: str = "application/json") -> _Response:
    # default=str: YAML front matter may hold dates, which json cannot encode natively.
    body = json.dumps(payload, default=str).encode()
    return _Response(status, body, {"Content-Type": f"{content_type}; charset=utf-8"})


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: LocalHub

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (killed mid-download by a test) is expected; anything else is printed."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so the client's connection pool can keep connections alive; every answer has a Content-Length.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without TCP_NODELAY each keep-alive answer can stall on
    # the peer's delayed ACK.
    disable_nagle_algorithm = True
    server: _HubHTTPServer

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    # Skip trailers up to the blank line that ends the message.
                    while self.rfile.readline().strip():
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        body = self._read_body()
        hold = self.server.hub._take_hold(
            self.command, self.path, "Range" in self.headers, self.headers.get("Range")
        )
        if hold is not None:  # outside the hub's lock: other requests go on while this one waits
            hold.arrived.set()
            hold.release.wait()
        response = self.server.hub._handle(self.command, self.path, self.headers, body)
        if response is None:
            self.close_connection = True
            return
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        # A HEAD answer carries the length of the GET body it describes, without the body.
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD" and response.body:
            if response.cut:
                self.wfile.write(response.body[: len(response.body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            if isinstance(response.body, DiskFile):
                for block in response.body.chunks():
                    self.wfile.write(block)
                return
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request stderr lines; `LocalHub.requests` is the log."""
