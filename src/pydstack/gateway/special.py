"""the gateway's own answers on the ``gateway`` and ``health`` ids (§2.3): one HTTP/1 GET per
connection over the terminated TLS, then close.

``gateway``: ``/health`` → 200; ``/index`` or ``/.dstack/index`` → the path list;
``/app-info`` and ``/acme-info`` (also under ``/.dstack/``) → JSON from callables the control
plane provides (the gateway's guest agent ``Info`` and ``AcmeInfo``); other GET paths 404,
other methods 405. ``health`` (legacy): ``GET /`` → 200, anything else 404.

:func:`parse_request_head` is sans-I/O: the method and path of a request head bounded to
:data:`MAX_HEAD` bytes (:class:`HttpHeadError`, an :class:`~pydstack.errors.InputError`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pydstack.errors import InputError

log = logging.getLogger(__name__)

MAX_HEAD = 8192
INDEX = {"type": "dstack gateway", "paths": ["/index", "/app-info", "/acme-info"]}

InfoSource = Callable[[], Awaitable[Any]]


class HttpHeadError(InputError):
    """not an HTTP/1 request head within the bound."""


def parse_request_head(buf: bytes) -> tuple[str, str] | None:
    """(method, path without the query) of the request head in `buf`, or None to read more."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) >= MAX_HEAD:
            raise HttpHeadError("request head too large")
        return None
    if end > MAX_HEAD:
        raise HttpHeadError("request head too large")
    line = buf[: buf.find(b"\r\n")]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise HttpHeadError("bad request line")
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError as e:
        raise HttpHeadError("bad request line") from e
    if not method.isalpha() or not target.startswith("/"):
        raise HttpHeadError("bad request line")
    return method, target.split("?", 1)[0]


def response(status: int, reason: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


def _json(status: int, value: Any) -> bytes:
    return response(status, "OK", json.dumps(value).encode(), "application/json")


def _text(status: int, reason: str, text: str) -> bytes:
    return response(status, reason, text.encode(), "text/plain")


async def answer(
    kind: str, method: str, path: str, app_info: InfoSource | None, acme_info: InfoSource | None
) -> bytes:
    """the whole response for one request to the `gateway` or `health` id."""
    if kind == "health":
        if method == "GET" and path == "/":
            return _text(200, "OK", "OK")
        return _text(404, "Not Found", "not found")
    if method != "GET":
        return _text(405, "Method Not Allowed", "method not allowed")
    name = path.removeprefix("/.dstack") if path.startswith("/.dstack/") else path
    if path == "/health":
        return _text(200, "OK", "OK")
    if name == "/index":
        return _json(200, INDEX)
    source = {"/app-info": app_info, "/acme-info": acme_info}.get(name)
    if name in ("/app-info", "/acme-info"):
        if source is None:
            return _text(503, "Service Unavailable", "not available")
        try:
            return _json(200, await source())
        except Exception:
            log.exception("gateway %s failed", name)
            return _text(500, "Internal Server Error", "internal error")
    return _text(404, "Not Found", "not found")


class SpecialProtocol(asyncio.Protocol):
    """reads one request head (bounded in size; the caller bounds it in time), answers, closes."""

    def __init__(
        self, kind: str, app_info: InfoSource | None, acme_info: InfoSource | None
    ) -> None:
        self.kind = kind
        self.app_info = app_info
        self.acme_info = acme_info
        self.buf = b""
        self.transport: Any = None
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.done.done() or self.transport is None:
            return
        self.buf += data
        try:
            head = parse_request_head(self.buf)
        except HttpHeadError:
            self.transport.write(_text(400, "Bad Request", "bad request"))
            self.finish()
            return
        if head is not None:
            self.transport.pause_reading()
            task = asyncio.ensure_future(self._respond(*head))
            task.add_done_callback(lambda _t: None)

    async def _respond(self, method: str, path: str) -> None:
        body = await answer(self.kind, method, path, self.app_info, self.acme_info)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(body)
        self.finish()

    def finish(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)
