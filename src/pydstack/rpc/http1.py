"""a lean HTTP/1.1 server for prpc services and small JSON routes: the hot paths' front end.

:class:`~.server.PrpcServer` (aiohttp) spends most of a small call in the framework. This server
parses with llhttp (`httptools`, the parser aiohttp's C extension and uvicorn use), keeps nothing
per request beyond the request itself, and answers from the same prpc call path
(:func:`~.server.resolve_call`, :func:`~.server.invoke_call`), the same :class:`RequestGuard` and
the same :class:`ServerLimits` as the aiohttp server, so a service behaves alike on either. It
serves plain TCP, Unix sockets and TLS (with optional client certificates; the handshake is the
event loop's, so it works on uvloop); no streaming, no upgrades: listeners that need those stay
on :class:`~.server.PrpcServer`.

Hostile input, bounded before anything is kept:

* the request line and headers together at most `MAX_HEAD` bytes and `MAX_HEADERS` fields; a
  second `Host`, `Origin`, `Sec-Fetch-Site`, `Content-Type` or `Content-Length` is refused (a
  check must not be passed by the first copy and read from another); protocol upgrades and
  `CONNECT` are refused; anything llhttp rejects (bad framing, `Content-Length` with
  `Transfer-Encoding`, obsolete line folding) is a 400 and the connection closes;
* a body larger than `max_body` is refused from its `Content-Length` before it is read, and a
  chunked body as soon as it grows past it (400, the prpc error format, then close);
* `Expect: 100-continue` gets its interim answer only for a body that will be accepted;
* at most `MAX_PIPELINED` parsed requests wait behind the one being answered (reading pauses);
* `ServerLimits`: the connection cap with eviction of the longest-waiting idle connection,
  `header_timeout` from the connection (or the first byte of a later request) to complete
  headers, `body_timeout` from headers to the end of the body, `idle_timeout` between requests.
  A connection closed for a limit is aborted without an answer. On TLS listeners the loop runs
  the handshake under `tls_handshake_timeout` before the connection is counted: connections
  still in their handshake are bounded by that timeout, not by the cap.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qsl

import httptools

from pydstack.crypto.certload import load_cert_der
from pydstack.types import jsonlimits

from .calls import (
    CLIENT_CERT_UNREADABLE,
    DEFAULT_MAX_BODY,
    JSON_CT,
    Answer,
    CallContext,
    PrpcService,
    dns_names,
    error_answer,
    invoke_call,
    peer_cred,
    refused_answer,
    resolve_call,
    server_ssl_context,
    unix_listener,
    wants_json,
)
from .guard import RequestGuard
from .json_codec import MAX_QUERY_FIELDS
from .limits import ConnectionTable, ServerLimits, connection_cap, raise_nofile_limit

__all__ = ["MAX_HEAD", "MAX_HEADERS", "MAX_PIPELINED", "Http1Server", "HttpRequest", "Route"]

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
MAX_HEADERS = 100
MAX_PIPELINED = 16
#: headers whose second copy is refused: the guard, the body mode and the framing read them
SINGLE_HEADERS = frozenset({"host", "origin", "sec-fetch-site", "content-type", "content-length"})
_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    500: "Internal Server Error",
}


class HttpRequest:
    """one parsed request: header names lower-case, values latin-1 text, the body complete."""

    __slots__ = ("_conn", "_query", "body", "headers", "method", "path", "query_string")

    def __init__(self, method: str, path: str, query_string: str, headers: dict[str, str]) -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers
        self.body = b""
        self._conn: _Connection | None = None
        self._query: dict[str, str] | None = None

    @property
    def query(self) -> Mapping[str, str]:
        """the query's fields (the first of a repeated name; at most MAX_QUERY_FIELDS)."""
        if self._query is None:
            out: dict[str, str] = {}
            if not self.query_string:
                self._query = out
                return out
            try:
                pairs = parse_qsl(
                    self.query_string, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS
                )
            except ValueError:
                pairs = []
            for k, v in pairs:
                out.setdefault(k, v)
            self._query = out
        return self._query

    @property
    def scheme(self) -> str:
        return "https" if self._conn is not None and self._conn.tls else "http"

    @property
    def is_unix(self) -> bool:
        """whether it came over a Unix socket (out of a browser's reach; see the guard)."""
        return self._conn is not None and self._conn.is_unix

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport if self._conn is not None else None

    @property
    def remote(self) -> str | None:
        return self._conn.remote if self._conn is not None else None

    def json(self) -> object:
        return jsonlimits.loads(self.body)


RouteHandler = Callable[[HttpRequest], Awaitable[Answer]]


class Route:
    """a plain route: `methods` on `path` (exact), answered by `handler`."""

    __slots__ = ("handler", "methods")

    def __init__(self, methods: frozenset[str], handler: RouteHandler) -> None:
        self.methods = methods
        self.handler = handler


class Http1Server:
    """prpc services and plain routes over HTTP/1.1 on TCP and Unix listeners (see module doc)."""

    def __init__(
        self,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        response_headers: Mapping[str, str] | None = None,
        limits: ServerLimits | None = None,
        guard: RequestGuard | None = None,
        route_error: Callable[[str, int], Answer] | None = None,
        eager: bool = False,
    ) -> None:
        """`route_error(message, status)` writes the errors of plain routes and of requests
        refused before routing (default `{"error": message}`); prpc paths answer in prpc's
        error format whatever it is.

        `eager`: start each handler inside the read callback, so one that finishes without
        waiting costs no task and no loop turn. Only for handlers that never need a current
        task (`asyncio.timeout`, aiohttp's client and `asyncio.current_task()` do): until its
        first wait such a handler runs outside any task."""
        self.max_body = max_body
        self.eager = eager
        self.route_error = route_error or _json_error
        self.limits = limits or ServerLimits()
        self.guard = guard or RequestGuard()
        self._extra_head = b"".join(
            f"{k}: {v}\r\n".encode("latin-1") for k, v in (response_headers or {}).items()
        )
        self._services: list[PrpcService] = []
        self._routes: dict[str, Route] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self.connections = ConnectionTable(self.limits.max_connections)
        self._cap_set = False
        self._closing = False
        self._sweeper: asyncio.TimerHandle | None = None
        timeouts = [
            t
            for t in (
                self.limits.header_timeout,
                self.limits.body_timeout,
                self.limits.idle_timeout,
            )
            if t > 0
        ]
        #: how often deadlines are checked: limits hold to within a quarter of the shortest
        self.sweep_interval = min(1.0, max(0.05, min(timeouts) / 4))

    @property
    def open_connections(self) -> int:
        return len(self.connections)

    @property
    def peak_connections(self) -> int:
        return self.connections.peak

    def mount(self, service: PrpcService) -> None:
        self._services.append(service)

    def route(self, methods: str | tuple[str, ...], path: str, handler: RouteHandler) -> None:
        names = (methods,) if isinstance(methods, str) else methods
        self._routes[path] = Route(frozenset(m.upper() for m in names), handler)

    # ------------------------------------------------------------------ answering
    async def answer(self, request: HttpRequest) -> Answer:
        """the answer to one complete request (never raises for bad input)."""
        refusal = self.guard.check(request)
        service, name = self._find(request.path)
        if refusal is not None:
            log.info(
                "refused %s %s from %s: %s",
                request.method,
                request.path[:100],
                request.remote,
                refusal.message,
            )
            if service is not None:
                return refused_answer(refusal, request)
            return self.route_error(refusal.message, refusal.status)
        if service is not None:
            if request.method not in ("GET", "POST"):
                return _json_error(
                    f"method {request.method} is not allowed", 405, {"Allow": "GET, POST"}
                )
            call = resolve_call(service, name, request)
            if isinstance(call, Answer):
                return call
            assert request._conn is not None
            try:
                peer = request._conn.context()
            except ValueError as e:
                return error_answer(CLIENT_CERT_UNREADABLE.format(e), call.json_mode)
            return await invoke_call(service, call, request.body, request.query_string, peer)
        route = self._routes.get(request.path)
        if route is None:
            return self.route_error("not found", 404)
        if request.method not in route.methods:
            allow = ", ".join(sorted(route.methods))
            return _with_headers(
                self.route_error(f"method {request.method} is not allowed", 405), {"Allow": allow}
            )
        try:
            return await route.handler(request)
        except Exception:
            log.exception("%s %s failed", request.method, request.path[:100])
            return self.route_error("internal error", 500)

    def _find(self, path: str) -> tuple[PrpcService | None, str]:
        for service in self._services:
            prefix = service.prefix.rstrip("/") + "/"
            if path.startswith(prefix):
                name = path[len(prefix) :]
                if name and "/" not in name:
                    return service, name
        return None, ""

    def refuse_early(self, request: HttpRequest, message: str) -> Answer:
        """the answer to a request refused before its body (too large): prpc's format on a prpc
        path, JSON elsewhere."""
        service, _ = self._find(request.path)
        if service is not None:
            return error_answer(message, wants_json(request))
        return self.route_error(message, 413)

    def encode(self, answer: Answer, keep_alive: bool) -> bytes:
        reason = _REASONS.get(answer.status, "Unknown")
        head = [
            f"HTTP/1.1 {answer.status} {reason}\r\n"
            f"content-type: {answer.content_type}\r\n"
            f"content-length: {len(answer.body)}\r\n".encode("latin-1"),
            self._extra_head,
        ]
        if answer.headers:
            head.extend(f"{k}: {v}\r\n".encode("latin-1") for k, v in answer.headers.items())
        if not keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        head.append(answer.body)
        return b"".join(head)

    # ------------------------------------------------------------------ deadlines
    def wake_sweeper(self) -> None:
        """make sure the deadline sweep runs while connections are open."""
        if self._sweeper is None and not self._closing:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(self.sweep_interval, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        for conn in self.connections.live():
            cast(_Connection, conn).expire(now)
        if len(self.connections):
            self.wake_sweeper()

    # ------------------------------------------------------------------ listeners
    def _setup(self) -> None:
        if not self._cap_set:
            self.connections.cap = connection_cap(self.limits.max_connections, raise_nofile_limit())
            self._cap_set = True

    def _factory(self) -> _Connection:
        return _Connection(self, asyncio.get_running_loop())

    async def listen_tcp(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """listen on `host`:`port` (0 picks one); returns the bound port. `reuse_port`: other
        processes of the same user may listen on the port too (the kernel spreads connections
        over them)."""
        self._setup()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            self._factory, host, port, reuse_address=True, reuse_port=reuse_port or None
        )
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def listen_tls(
        self,
        host: str,
        port: int,
        *,
        cert_pem: str,
        key_pem: str,
        client_ca_pem: str | None = None,
        require_client_cert: bool = False,
    ) -> int:
        """TLS on `host`:`port` (0 picks one; returns the bound port); the certificate's DNS
        names become allowed Host names; handlers see the client certificate in
        `CallContext.peer_cert`."""
        self.guard = self.guard.with_hosts(dns_names(cert_pem))
        ctx = server_ssl_context(cert_pem, key_pem, client_ca_pem, require_client_cert)
        self._setup()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            self._factory,
            host,
            port,
            ssl=ctx,
            ssl_handshake_timeout=self.limits.tls_handshake_timeout,
            reuse_address=True,
        )
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def listen_unix(
        self, path: str | Path, mode: int = 0o660, group: str | int | None = None
    ) -> None:
        """a Unix socket at `path`, as :meth:`PrpcServer.listen_unix` (stale socket replaced,
        other files refused with RuntimeError, mode and group set, unknown group ValueError)."""
        self._setup()
        loop = asyncio.get_running_loop()

        async def start(address: str) -> None:
            self._servers.append(await loop.create_unix_server(self._factory, address))

        await unix_listener(path, mode, group, start)

    async def close(self) -> None:
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        self.connections.abort_all("server stopping")
        for server in servers:
            await server.wait_closed()


def _with_headers(answer: Answer, headers: Mapping[str, str]) -> Answer:
    return Answer(
        answer.status, answer.body, answer.content_type, {**(answer.headers or {}), **headers}
    )


def _json_error(message: str, status: int, headers: Mapping[str, str] | None = None) -> Answer:
    return Answer(status, json.dumps({"error": message}).encode(), JSON_CT, headers)


class _Continue:
    """awaiting this finishes a coroutine that was started by hand and yielded `first` (what a
    Task does with a coroutine it starts; see :meth:`_Connection._pump`)."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, Answer], first: Any) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, None, Answer]:
        value = self.first
        while True:
            try:
                yield value  # the task waits on what the coroutine waits on
            except BaseException as e:  # thrown in by the task (cancellation)
                try:
                    value = self.coro.throw(e)
                except StopIteration as stop:
                    return cast(Answer, stop.value)
                continue
            try:
                value = self.coro.send(None)
            except StopIteration as stop:
                return cast(Answer, stop.value)


class _Connection(asyncio.Protocol):
    """one accepted connection: admission, llhttp parsing with bounds, the phase deadlines, and
    answering its requests in order.

    Requests are answered in order, each in a task; on an `eager` server a handler starts inside
    the read callback, so one that finishes without waiting (a cached key, `Version`) costs no
    task and no loop turn, and one that waits continues in a task.
    """

    def __init__(self, server: Http1Server, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop
        self._limits = server.limits
        self._table = server.connections
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.is_unix = False
        self.tls = False
        self._parser = httptools.HttpRequestParser(self)
        self._ctx: CallContext | None = None
        self._queue: deque[tuple[HttpRequest, bool]] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._paused = False
        # the request being parsed
        self._url = b""
        self._head_bytes = 0
        self._headers: dict[str, str] = {}
        self._nheaders = 0
        self._request: HttpRequest | None = None
        self._body: list[bytes] = []
        self._body_len = 0
        #: the answer to a request that could not be parsed or accepted: written after the
        #: answers to the requests before it, then the connection closes
        self._failed: Answer | None = None
        self._eof = False
        #: what the parser is in: None (between requests) | head | body
        self._parsing: str | None = None
        #: new | head (waiting for request headers) | body | busy (answering) | idle | closed
        self.phase = "new"
        self.waiting_since = loop.time()
        #: when the current phase's limit runs out (head, body, idle; see Http1Server._sweep)
        self.deadline = float("inf")

    @property
    def evictable(self) -> bool:
        return self.phase in ("head", "idle") and self._worker is None

    def context(self) -> CallContext:
        """the peer as handlers see it (computed once per connection)."""
        if self._ctx is None:
            sock = self.transport.get_extra_info("socket") if self.transport else None
            cred = peer_cred(sock)
            cert = None
            ssl_obj = self.transport.get_extra_info("ssl_object") if self.transport else None
            if ssl_obj is not None:
                der = ssl_obj.getpeercert(binary_form=True)
                if der:
                    cert = load_cert_der(der)  # ValueError: answered as a refusal
            self._ctx = CallContext(cert, cred, self.remote)
        return self._ctx

    # ---------------------------------------------------------------- lifecycle
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if not self._table.admit(self):
            log.debug("connection refused: %d connections open, none idle", len(self._table))
            self.phase = "closed"
            self.transport.abort()
            return
        sock = transport.get_extra_info("socket")
        self.is_unix = sock is not None and sock.family == socket.AF_UNIX
        self.tls = transport.get_extra_info("ssl_object") is not None
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.remote = str(peer[0])
        self._wait("head", self._limits.header_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closed()
        self._queue.clear()
        if self._worker is not None:
            self._worker.cancel()

    def _closed(self) -> None:
        self.phase = "closed"
        self._table.forget(self)

    def abort(self, why: str) -> None:
        """drop the connection now (no answer)."""
        log.debug("closing connection: %s", why)
        self._closed()
        if self.transport is not None:
            self.transport.abort()

    def _finish(self) -> None:
        """a graceful close after the last answer."""
        self._closed()
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.phase == "closed" or self._failed is not None:
            return
        if self.phase == "idle":
            self._wait("head", self._limits.header_timeout, reset_since=False)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(self._server.route_error("protocol upgrades are not supported", 400))
        except httptools.HttpParserError as e:
            refused = e.__context__
            if isinstance(refused, _Refused):
                if refused.request is not None:
                    self._fail(self._server.refuse_early(refused.request, refused.message))
                else:
                    self._fail(self._server.route_error(refused.message, refused.status))
            else:
                message = f"malformed request: {_parser_reason(e)}"
                self._fail(self._server.route_error(message, 400))
        if self._worker is None:
            self._pump()

    def eof_received(self) -> bool | None:
        if self._worker is None:
            return None  # nothing being answered: close
        self._eof = True
        return True  # answer what was asked, then close

    def _fail(self, answer: Answer) -> None:
        self._failed = answer
        self._request = None
        log.info("refused a request from %s: %s", self.remote, answer.body[:200].decode())

    # ---------------------------------------------------------------- llhttp callbacks
    def on_message_begin(self) -> None:
        self._parsing = "head"
        self._url = b""
        self._head_bytes = 0
        self._headers = {}
        self._nheaders = 0
        self._request = None
        self._body = []
        self._body_len = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        self._nheaders += 1
        if self._nheaders > MAX_HEADERS:
            raise _Refused(400, f"too many header fields (max {MAX_HEADERS})")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        if key in self._headers:
            if key in SINGLE_HEADERS:
                raise _Refused(400, f"duplicate {key} header")
            self._headers[key] += ", " + text
        else:
            self._headers[key] = text

    def _count_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEAD:
            raise _Refused(400, f"request head too large (max {MAX_HEAD} bytes)")

    def on_headers_complete(self) -> None:
        method = self._parser.get_method().decode("latin-1")
        if method == "CONNECT":
            raise _Refused(405, "CONNECT is not supported")
        if self._parser.should_upgrade():
            raise _Refused(400, "protocol upgrades are not supported")
        url = self._url.decode("latin-1")
        path, _, query = url.partition("?")
        request = HttpRequest(method, path.split("#", 1)[0], query, self._headers)
        request._conn = self
        self._request = request
        length = self._headers.get("content-length")
        if length is not None and (len(length) > 18 or int(length) > self._server.max_body):
            raise _Refused(400, self._too_large(), request)
        if self._headers.get("expect", "").lower() == "100-continue" and self.transport:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._parsing = "body"
        if self._worker is None and not self._queue:
            self._wait("body", self._limits.body_timeout)

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > self._server.max_body:
            raise _Refused(400, self._too_large(), self._request)
        self._body.append(body)

    def _too_large(self) -> str:
        return f"request body too large (max {self._server.max_body} bytes)"

    def on_message_complete(self) -> None:
        request = self._request
        assert request is not None
        request.body = b"".join(self._body)
        self._body = []
        self._request = None
        self._parsing = None
        self._queue.append((request, self._parser.should_keep_alive()))
        self.phase = "busy"
        if len(self._queue) >= MAX_PIPELINED and self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    # ---------------------------------------------------------------- answering
    def _pump(self) -> None:
        """answer the queued requests in order; one that waits continues in a task."""
        while self._queue and self.phase != "closed":
            request, keep_alive = self._queue.popleft()
            coro = self._server.answer(request)
            if not self._server.eager:
                self.phase = "busy"
                self._worker = self._loop.create_task(
                    self._finish_answer(request, coro, None, keep_alive)
                )
                return
            try:
                first = coro.send(None)
            except StopIteration as stop:
                if not self._write(stop.value, keep_alive):
                    return
                continue
            except Exception:
                self._write(self._failed_answer(request), False)
                return
            self.phase = "busy"
            self._worker = self._loop.create_task(
                self._finish_answer(request, coro, first, keep_alive)
            )
            return
        self._after_answers()

    def _failed_answer(self, request: HttpRequest) -> Answer:
        """the answer when answering raised (a bug; bad input never does): a 500 that closes
        the connection, and the traceback in the log."""
        log.exception("answering %s %s failed", request.method, request.path[:100])
        return self._server.route_error("internal error", 500)

    async def _finish_answer(
        self, request: HttpRequest, coro: Coroutine[Any, Any, Answer], first: Any, keep_alive: bool
    ) -> None:
        """finish answering in a task: `coro` from its start, or (eager) from where it yielded
        `first`."""
        try:
            answer = await (coro if not self._server.eager else _Continue(coro, first))
        except Exception:
            answer, keep_alive = self._failed_answer(request), False
        finally:
            self._worker = None
        if self._write(answer, keep_alive):
            self._pump()

    def _write(self, answer: Answer, keep_alive: bool) -> bool:
        """write one answer; False when the connection is done."""
        if self.phase == "closed" or self.transport is None:
            return False
        self.transport.write(self._server.encode(answer, keep_alive))
        if not keep_alive:
            self._finish()
            return False
        if self._paused and len(self._queue) < MAX_PIPELINED // 2:
            self._paused = False
            self.transport.resume_reading()
        return True

    def _after_answers(self) -> None:
        if self.phase == "closed" or self.transport is None:
            return
        if self._failed is not None:
            self.transport.write(self._server.encode(self._failed, False))
            self._finish()
        elif self._eof:
            self._finish()
        elif self.phase != "busy":
            return  # nothing was answered: the running deadline stays
        elif self._parsing == "head":  # the next request has begun: its own deadlines
            self._wait("head", self._limits.header_timeout)
        elif self._parsing == "body":
            self._wait("body", self._limits.body_timeout)
        elif self._limits.idle_timeout == 0:
            self._finish()
        else:
            self._wait("idle", self._limits.idle_timeout)

    # ---------------------------------------------------------------- deadlines
    def _wait(self, phase: str, timeout: float, *, reset_since: bool = True) -> None:
        now = self._loop.time()
        self.phase = phase
        if reset_since:
            self.waiting_since = now
        self.deadline = now + timeout
        self._server.wake_sweeper()

    def expire(self, now: float) -> None:
        """close the connection if its phase's deadline has passed."""
        if self.phase in ("head", "body", "idle") and now >= self.deadline:
            self.abort(
                {
                    "head": "request headers too slow",
                    "body": "request body too slow",
                }.get(self.phase, "idle keep-alive timeout")
            )


class _Refused(Exception):
    def __init__(self, status: int, message: str, request: HttpRequest | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.request = request


def _parser_reason(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text[:100].lower()
