"""aiohttp sites under :class:`~pydstack.rpc.limits.ServerLimits`.

aiohttp accepts any number of connections and waits on each for as long as its peer likes. A
:class:`LimitedSite` accepts plain TCP or Unix connections itself and enforces a
:class:`ServerLimits` before and around aiohttp's request handling:

* at most `max_connections` open connections per server (all its sites together), counting those
  still in the TLS handshake. At the cap a new connection evicts the one that has been waiting
  longest without a request in progress (handshake, headers, keep-alive); when every connection
  is busy the new one is closed at once;
* TLS is done here (`loop.start_tls`) with `tls_handshake_timeout`, so a client that never sends
  its ClientHello is dropped; the handler still sees the peer certificate (`ssl_object`) and the
  socket (`socket`, SO_PEERCRED) through the transport's extra info;
* `header_timeout`: a request's complete headers must arrive within this of the connection being
  ready (after the handshake) or of the first byte of a later request, however the bytes trickle;
* `body_timeout`: the whole body must arrive within this of the headers;
* `idle_timeout`: a keep-alive connection with no new request for this long is closed (0 closes
  it after each response).

Closing for a limit is an abort (no response): the client was too slow to be answered.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .limits import ConnectionTable, ServerLimits, connection_cap, raise_nofile_limit

log = logging.getLogger(__name__)


class LimitedRunner(web.AppRunner):
    """an AppRunner whose :class:`LimitedSite` listeners share one :class:`ServerLimits`."""

    def __init__(self, app: web.Application, limits: ServerLimits) -> None:
        self.limits = limits
        # aiohttp's own keep-alive close stays as a backstop behind ours
        self.handler_kwargs: dict[str, Any] = {
            "access_log": None,
            "keepalive_timeout": limits.header_timeout + limits.idle_timeout + 1.0,
        }
        super().__init__(app, handle_signals=False, **self.handler_kwargs)
        self.connections = ConnectionTable(limits.max_connections)

    async def setup(self) -> None:
        self.connections.cap = connection_cap(self.limits.max_connections, raise_nofile_limit())
        await super().setup()

    async def cleanup(self) -> None:
        self.connections.abort_unstarted()
        await super().cleanup()


class LimitedSite(web.BaseSite):
    """a TCP (`host`, `port`) or Unix (`path`) listener of a :class:`LimitedRunner`, optionally
    TLS; `port` is the bound port after :meth:`start`."""

    def __init__(
        self,
        runner: LimitedRunner,
        *,
        host: str | None = None,
        port: int = 0,
        path: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self.limited_runner = runner
        self.host = host
        self.path = path
        self._port = port

    @property
    def port(self) -> int:
        server = self._server
        socks = getattr(server, "sockets", None) or []
        return int(socks[0].getsockname()[1]) if socks and self.path is None else self._port

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        if self.path is not None:
            return f"{scheme}://unix:{self.path}:"
        return f"{scheme}://{self.host or '0.0.0.0'}:{self.port}"

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        return self._ssl_context

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._ssl_context is not None and "uvloop" in type(loop).__module__:
            # asyncio's loop runs the TLS task before a connection's first read; uvloop starts
            # reading right after connection_made, so a ClientHello could reach the plain
            # protocol before start_tls takes the transport over
            raise RuntimeError("tls listeners need asyncio's event loop, not uvloop")
        await super().start()

        def factory() -> _Connection:
            return _Connection(self, loop)

        if self.path is not None:
            self._server = await loop.create_unix_server(factory, self.path, backlog=self._backlog)
        else:
            self._server = await loop.create_server(
                factory, self.host, self._port, backlog=self._backlog, reuse_address=True
            )


class _Handler(RequestHandler):
    """aiohttp's request handler, telling its connection when a request starts and ends.

    `_handle_request` is aiohttp's per-request step (3.9 to 3.14): headers parsed, handler run,
    response written. The limit tests fail if a new aiohttp stops calling it.
    """

    __slots__ = ("_connection",)

    def __init__(self, manager: Any, *, connection: _Connection, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._connection = connection

    async def _handle_request(
        self,
        request: web.BaseRequest,
        start_time: float | None,
        request_handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    ) -> tuple[web.StreamResponse, bool]:
        self._connection.request_started(request)
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            self._connection.request_finished()


class _Connection(asyncio.Protocol):
    """one accepted connection: admission, TLS, the phase timers; HTTP is aiohttp's."""

    def __init__(self, site: LimitedSite, loop: asyncio.AbstractEventLoop) -> None:
        self._site = site
        self._loop = loop
        self._limits = site.limited_runner.limits
        self._table = site.limited_runner.connections
        self._raw: asyncio.Transport | None = None
        self._transport: asyncio.Transport | None = None
        self._handler: _Handler | None = None
        self._early: list[bytes] = []
        self._early_eof = False
        self._timer: asyncio.Handle | None = None
        self._request: web.BaseRequest | None = None
        self._next_request_started = False
        self._tls_task: asyncio.Task[None] | None = None
        #: handshake | head (waiting for request headers) | idle (keep-alive) | busy | closed
        self.phase = "new"
        self.waiting_since = loop.time()

    @property
    def evictable(self) -> bool:
        return self.phase in ("handshake", "head", "idle")

    # ---------------------------------------------------------------- lifecycle
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._raw = transport
        if not self._table.admit(self):
            log.debug("connection refused: %d connections open, none idle", len(self._table))
            self.phase = "closed"
            transport.abort()
            return
        ctx = self._site.ssl_context
        if ctx is None:
            self._start_http(transport)
        else:
            self.phase = "handshake"
            self._tls_task = self._loop.create_task(self._tls(transport, ctx))

    async def _tls(self, raw: asyncio.Transport, ctx: ssl.SSLContext) -> None:
        try:
            tls = await self._loop.start_tls(
                raw,
                self,
                ctx,
                server_side=True,
                ssl_handshake_timeout=self._limits.tls_handshake_timeout,
            )
        except (Exception, asyncio.CancelledError) as e:
            log.debug("tls handshake failed: %s", str(e) or type(e).__name__)
            self._closed()
            return
        if tls is None or self.phase == "closed":
            self._closed()
            return
        self._start_http(tls)

    def _start_http(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        runner = self._site.limited_runner
        assert runner.server is not None
        handler = _Handler(runner.server, connection=self, loop=self._loop, **runner.handler_kwargs)
        self._handler = handler
        self._wait("head", self._limits.header_timeout)
        handler.connection_made(transport)
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)
        if self._early_eof:
            handler.eof_received()

    def data_received(self, data: bytes) -> None:
        handler = self._handler
        if handler is None:  # decrypted before start_tls returned
            self._early.append(data)
            return
        if self.phase == "idle" and data:
            self._wait("head", self._limits.header_timeout, reset_since=False)
        elif self.phase == "busy" and self._request is not None and self._request.content.is_eof():
            self._next_request_started = True
        handler.data_received(data)

    def eof_received(self) -> bool | None:
        if self._handler is None:
            self._early_eof = True
            return True
        self._handler.eof_received()
        return None  # aiohttp's answer: the transport closes its side

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closed()
        if self._handler is not None:
            self._handler.connection_lost(exc)

    def _closed(self) -> None:
        self.phase = "closed"
        self._cancel_timer()
        self._table.forget(self)

    def abort(self, why: str) -> None:
        """drop the connection now (no response)."""
        log.debug("closing connection: %s", why)
        self._closed()
        if self._raw is not None:
            self._raw.abort()

    # ---------------------------------------------------------------- phases
    def request_started(self, request: web.BaseRequest) -> None:
        if self.phase == "closed":
            return
        self._cancel_timer()
        self.phase = "busy"
        self._request = request
        self._next_request_started = False
        if not request.content.is_eof():
            self._timer = self._loop.call_later(self._limits.body_timeout, self._body_deadline)

    def request_finished(self) -> None:
        self._request = None
        if self.phase == "closed":
            return
        if self._next_request_started:
            self._wait("head", self._limits.header_timeout)
        elif self._limits.idle_timeout == 0:
            self.phase = "idle"
            self._cancel_timer()
            self._timer = self._loop.call_soon(self._close_idle)
        else:
            self._wait("idle", self._limits.idle_timeout)

    def _wait(self, phase: str, timeout: float, *, reset_since: bool = True) -> None:
        self._cancel_timer()
        self.phase = phase
        if reset_since:
            self.waiting_since = self._loop.time()
        self._timer = self._loop.call_later(timeout, self._deadline, phase)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _deadline(self, phase: str) -> None:
        self._timer = None
        if self.phase == phase:
            self.abort("request headers too slow" if phase == "head" else "idle keep-alive timeout")

    def _body_deadline(self) -> None:
        self._timer = None
        request = self._request
        if self.phase == "busy" and request is not None and not request.content.is_eof():
            self.abort("request body too slow")

    def _close_idle(self) -> None:
        self._timer = None
        if self.phase == "idle" and self._transport is not None:
            self._closed()
            self._transport.close()  # keep-alive is off: a graceful close
