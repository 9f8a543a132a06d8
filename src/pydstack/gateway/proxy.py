"""the data plane of one process: accept, sniff, route, connect, relay (§2).

Per connection:

1. with ``inbound_pp_enabled`` a PROXY v1/v2 header is read within ``timeouts.pp_header`` (a
   stream without one is closed); otherwise a v2 header is synthesised from the socket's peer
   and local addresses, for backends whose port policy asks for ``pp``;
2. the ClientHello is **peeked** (``MSG_PEEK``, waiting for more with ``SO_RCVLOWAT``) until it
   parses, within 4096 bytes and ``timeouts.handshake``: the bytes stay in the socket, so
   passthrough relays them as they are and TLS termination is done by the event loop's own TLS
   (uvloop's) on the untouched socket;
3. an SNI whose parent domain has a certificate follows the ingress grammar (``gateway`` and
   ``health`` are answered here, ``localhost`` with the debug switch goes to 127.0.0.1, other ids
   through :meth:`RouteTable.resolve`); any other SNI is a custom domain resolved through DNS TXT
   and passed through;
4. the candidates are connected to concurrently within ``timeouts.connect`` (first wins, the
   others are closed), while the TLS handshake (terminate: no ALPN; ``g``: ALPN ``h2``) runs
   within ``timeouts.handshake``;
5. a PROXY v2 header goes first where the chosen instance's policy says ``pp``, then bytes are
   relayed (:mod:`.relay`) until either side closes, the idle watchdog (``timeouts.idle``, when
   ``data_timeout_enabled``) or ``timeouts.total`` ends it.

Every refusal closes the connection and is logged at debug level with the reason; nothing a
client sends can stop the others from being served. :attr:`ProxyServer.on_refused` lets tests
and stats see refusals.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydstack.errors import DstackError

from . import ingress
from .app_address import AppAddressError, AppAddressResolver
from .certstore import CertStore
from .config import ProxyConfig
from .proxy_protocol import ProxyHeader, encode_v2, parse_proxy_header
from .relay import Relay
from .routes import Candidate, RouteError, RouteTable
from .sni import MAX_CLIENT_HELLO, ClientHello, parse_client_hello
from .special import InfoSource, SpecialProtocol

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
BACKLOG = 4096
_ACCEPT_BATCH = 64


class Refused(DstackError):
    """a connection closed by the gateway; the message says why."""


@dataclass
class ProxyStats:
    """counters of one process (`connections` is live, the rest cumulative)."""

    connections: int = 0
    accepted: int = 0
    refused: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


def listen_socket(addr: str, port: int) -> socket.socket:
    """a non-blocking listening socket with SO_REUSEPORT (one per worker process)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((addr, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ProxyServer:
    """the relay of one process, reading `table` and `certs` (filled by the control plane or a
    supervisor's snapshots)."""

    def __init__(
        self,
        config: ProxyConfig,
        table: RouteTable,
        certs: CertStore,
        *,
        resolver: AppAddressResolver | None = None,
        app_info: InfoSource | None = None,
        acme_info: InfoSource | None = None,
        localhost: str = LOCALHOST,
    ) -> None:
        self.config = config
        self.table = table
        self.certs = certs
        self.resolver = resolver or AppAddressResolver(
            prefix=config.app_address_ns_prefix,
            compat=config.app_address_ns_compat,
            dns_servers=config.app_address_dns_servers,
            timeout=config.timeouts.dns_resolve,
        )
        self.app_info = app_info
        self.acme_info = acme_info
        self.localhost = localhost
        self.stats = ProxyStats()
        self.on_refused: Callable[[str], None] | None = None
        self.relays: set[Relay] = set()
        self._pending: set[asyncio.Task[None]] = set()
        self._listeners: list[socket.socket] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        t = config.timeouts
        self._sweep_every = max(t.idle / 4, 0.5)
        self._idle_sweeps = max(1, math.ceil(t.idle / self._sweep_every))

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, sockets: list[socket.socket] | None = None) -> list[tuple[str, int]]:
        """listen on `sockets` or on ``listen_addr`` × ``listen_ports``; the bound addresses."""
        self._loop = asyncio.get_running_loop()
        if sockets is None:
            sockets = [listen_socket(self.config.listen_addr, p) for p in self.config.listen_ports]
        for sock in sockets:
            sock.setblocking(False)
            self._listeners.append(sock)
            self._loop.add_reader(sock.fileno(), self._accept_ready, sock)
        self._sweeper = self._loop.call_later(self._sweep_every, self._sweep)
        return [s.getsockname()[:2] for s in sockets]

    def stop_accepting(self) -> None:
        for sock in self._listeners:
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners.clear()

    async def close(self, grace: float | None = None) -> None:
        """stop accepting, let live connections run for `grace` seconds (default
        ``timeouts.shutdown``), then drop the rest."""
        self.stop_accepting()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._pending):
            task.cancel()
        deadline = time.monotonic() + (self.config.timeouts.shutdown if grace is None else grace)
        while self.relays and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for relay in list(self.relays):
            relay.abort()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    # --- accept ---------------------------------------------------------------------------

    def _accept_ready(self, lsock: socket.socket) -> None:
        assert self._loop is not None
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept failed: %s", e.strerror)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.stats.accepted += 1
            task = self._loop.create_task(self._handle(conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    # --- per connection -------------------------------------------------------------------

    def _refuse(self, reason: str) -> None:
        self.stats.refused += 1
        key = reason.split(":", 1)[0]
        self.stats.by_reason[key] = self.stats.by_reason.get(key, 0) + 1
        log.debug("connection refused: %s", reason)
        if self.on_refused is not None:
            self.on_refused(reason)

    async def _handle(self, sock: socket.socket) -> None:
        handed_off = False
        try:
            handed_off = await self._route_and_connect(sock)
        except Refused as e:
            self._refuse(str(e))
        except TimeoutError:
            self._refuse("timeout")
        except (DstackError, ssl.SSLError, OSError, ConnectionError) as e:
            self._refuse(f"{type(e).__name__}: {e}")
        except asyncio.CancelledError:
            pass
        except Exception:
            # a bug must cost one connection, never the listener
            log.exception("connection handler failed")
            self._refuse("internal error")
        finally:
            if not handed_off:
                sock.close()

    async def _route_and_connect(self, sock: socket.socket) -> bool:
        """True once the socket belongs to a transport (the relay or the special server)."""
        t = self.config.timeouts
        if self.config.inbound_pp_enabled:
            async with asyncio.timeout(t.pp_header):
                header = await self._read_proxy_header(sock)
            pp: bytes | None = header.to_v2()
        else:
            pp = None  # synthesised from the socket only for a backend that wants it
        async with asyncio.timeout(t.handshake):
            hello = await self._peek_hello(sock)
        domain = self.certs.for_sni(hello.sni)
        if domain is None:
            return await self._custom_domain(sock, hello, pp)
        try:
            target = ingress.classify(
                hello.sni, localhost_backend=self.config.insecure_localhost_backend
            )
        except ingress.IngressError as e:
            raise Refused(str(e)) from None
        dest = target.dest
        if target.kind in (ingress.Kind.GATEWAY, ingress.Kind.HEALTH):
            return await self._serve_special(sock, target.kind.value, domain.plain)
        if target.kind is ingress.Kind.LOCALHOST:
            candidates = [Candidate(None, self.localhost, False)]
        else:
            try:
                candidates = self.table.resolve(dest.id, dest.port)
            except RouteError as e:
                raise Refused(str(e)) from None
        if dest.mode is ingress.Mode.PASSTHROUGH:
            ctx = None
        else:
            ctx = domain.h2 if dest.mode is ingress.Mode.H2 else domain.plain
        return await self._connect(sock, candidates, dest.port, ctx, pp)

    async def _custom_domain(
        self, sock: socket.socket, hello: ClientHello, pp: bytes | None
    ) -> bool:
        try:
            addr = await self.resolver.resolve(hello.sni)
        except AppAddressError as e:
            raise Refused(str(e)) from None
        try:
            candidates = self.table.resolve(addr.id, addr.port)
        except RouteError as e:
            raise Refused(str(e)) from None
        return await self._connect(sock, candidates, addr.port, None, pp)

    async def _serve_special(self, sock: socket.socket, kind: str, ctx: ssl.SSLContext) -> bool:
        assert self._loop is not None
        t = self.config.timeouts
        proto = SpecialProtocol(kind, self.app_info, self.acme_info)
        transport, _ = await self._loop.connect_accepted_socket(
            lambda: proto, sock, ssl=ctx, ssl_handshake_timeout=t.handshake
        )
        try:
            async with asyncio.timeout(t.handshake):
                await proto.done
        except TimeoutError:
            transport.abort()
        return True

    async def _connect(
        self,
        sock: socket.socket,
        candidates: list[Candidate],
        port: int,
        ctx: ssl.SSLContext | None,
        pp: bytes | None,
    ) -> bool:
        loop = self._loop
        assert loop is not None
        t = self.config.timeouts
        relay = Relay(
            high_water=self.config.buffer_size,
            shutdown_timeout=t.shutdown,
            started=loop.time(),
            on_close=self._relay_closed,
        )
        backend = loop.create_task(self._connect_backend(relay, candidates, port))
        try:
            if ctx is None:
                await loop.connect_accepted_socket(lambda: relay.client, sock)
            else:
                await loop.connect_accepted_socket(
                    lambda: relay.client, sock, ssl=ctx, ssl_handshake_timeout=t.handshake
                )
        except BaseException:
            backend.cancel()
            with contextlib.suppress(BaseException):
                await backend
            relay.closed = True
            if relay.backend.transport is not None:
                relay.backend.transport.abort()
            raise
        self.relays.add(relay)
        self.stats.connections += 1
        try:
            chosen = await backend
        except BaseException:
            relay.close()
            raise
        if relay.closed:
            # the client went away during the connect
            if relay.backend.transport is not None:
                relay.backend.transport.abort()
            return True
        if chosen.instance is not None:
            relay.instance_id = chosen.instance.instance_id
            self.table.conn_opened(relay.instance_id)
        if chosen.pp and pp is None:
            pp = encode_v2(_addr(sock.getpeername()), _addr(sock.getsockname()))
        relay.link(pp if chosen.pp and pp is not None else b"")
        return True

    async def _connect_backend(
        self, relay: Relay, candidates: list[Candidate], port: int
    ) -> Candidate:
        """connect the relay's backend side to the first candidate that answers."""
        loop = self._loop
        assert loop is not None
        async with asyncio.timeout(self.config.timeouts.connect):
            if len(candidates) == 1:
                c = candidates[0]
                await loop.create_connection(lambda: relay.backend, c.host, port)
                _nodelay(relay.backend.transport)
                return c
            return await self._race(relay, candidates, port)

    async def _race(self, relay: Relay, candidates: list[Candidate], port: int) -> Candidate:
        """connect to every candidate at once; the first connected wins, the rest are closed."""
        loop = self._loop
        assert loop is not None

        async def one(c: Candidate) -> tuple[Candidate, socket.socket]:
            s = socket.socket(socket.AF_INET6 if ":" in c.host else socket.AF_INET)
            s.setblocking(False)
            try:
                await loop.sock_connect(s, (c.host, port))
            except BaseException:
                s.close()
                raise
            return c, s

        tasks = [loop.create_task(one(c)) for c in candidates]
        winner: tuple[Candidate, socket.socket] | None = None
        error: BaseException | None = None
        try:
            for fut in asyncio.as_completed(tasks):
                try:
                    winner = await fut
                    break
                except OSError as e:
                    error = e
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    res = await task
                    if winner is None or res[1] is not winner[1]:
                        res[1].close()
        if winner is None:
            raise error or OSError("no backend answered")
        c, s = winner
        await loop.create_connection(lambda: relay.backend, sock=s)
        _nodelay(relay.backend.transport)
        return c

    def _relay_closed(self, relay: Relay) -> None:
        if relay in self.relays:
            self.relays.discard(relay)
            self.stats.connections -= 1
        if relay.instance_id is not None:
            self.table.conn_closed(relay.instance_id)
            relay.instance_id = None

    # --- reading the first bytes without consuming them -----------------------------------

    async def _wait_readable(self, fd: int) -> None:
        loop = self._loop
        assert loop is not None
        fut: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, ready)
        try:
            await fut
        finally:
            loop.remove_reader(fd)

    async def _peek(self, sock: socket.socket, limit: int, parse: Callable[[bytes], Any]) -> Any:
        """peek at the socket until `parse` returns non-None; Refused on EOF. Waits for more bytes
        than already buffered with SO_RCVLOWAT (reset afterwards)."""
        lowat = 1
        seen = -1
        try:
            while True:
                try:
                    data = sock.recv(limit, socket.MSG_PEEK)
                except (BlockingIOError, InterruptedError):
                    data = None
                if data is not None:
                    if not data or len(data) == seen:
                        raise Refused("connection closed before the client hello")
                    result = parse(data)
                    if result is not None:
                        return result
                    seen = len(data)
                    lowat = seen + 1
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
                await self._wait_readable(sock.fileno())
        finally:
            if lowat != 1:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    async def _peek_hello(self, sock: socket.socket) -> ClientHello:
        try:
            hello: ClientHello = await self._peek(sock, MAX_CLIENT_HELLO, parse_client_hello)
        except DstackError as e:
            raise Refused(str(e)) from None
        return hello

    async def _read_proxy_header(self, sock: socket.socket) -> ProxyHeader:
        try:
            header, used = await self._peek(sock, 2048, parse_proxy_header)
        except DstackError as e:
            raise Refused(str(e)) from None
        got = sock.recv(used)
        if len(got) != used:
            raise Refused("proxy header vanished")
        assert isinstance(header, ProxyHeader)
        return header

    # --- watchdogs ------------------------------------------------------------------------

    def _sweep(self) -> None:
        """one pass of the idle watchdog and the total-time limit over every relay."""
        loop = self._loop
        assert loop is not None
        t = self.config.timeouts
        now = loop.time()
        for relay in list(self.relays):
            if now - relay.started > t.total:
                relay.abort()
                continue
            if not t.data_timeout_enabled:
                continue
            if relay.ticks != relay.seen_ticks:
                relay.seen_ticks = relay.ticks
                relay.idle_sweeps = 0
            else:
                relay.idle_sweeps += 1
                if relay.idle_sweeps >= self._idle_sweeps:
                    relay.abort()
        self._sweeper = loop.call_later(self._sweep_every, self._sweep)


def _nodelay(transport: Any) -> None:
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _addr(addr: Any) -> tuple[str, int] | None:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[0]), int(addr[1])
    return None
