"""the data plane of one process: accept, sniff, route, connect, relay (§2).

Per connection:

1. with ``inbound_pp_enabled`` a PROXY v1/v2 header is read within ``timeouts.pp_header`` (a
   stream without one is closed); otherwise a v2 header is synthesised from the socket's peer
   and local addresses, for backends whose port policy asks for ``pp``;
2. the ClientHello is **peeked** (``MSG_PEEK``, waiting for more with ``SO_RCVLOWAT``) until it
   parses, within 4096 bytes and ``timeouts.handshake``: the bytes stay in the socket, so
   passthrough relays them as they are and TLS termination starts on the untouched socket;
3. an SNI whose parent domain has a certificate follows the ingress grammar (``gateway`` and
   ``health`` are answered here, ``localhost`` with the debug switch goes to 127.0.0.1, other ids
   through :meth:`RouteTable.resolve`); any other SNI is a custom domain resolved through DNS TXT
   and passed through;
4. the candidates are connected to concurrently within ``timeouts.connect`` (first wins, the
   others are closed), while the TLS handshake (terminate: no ALPN; ``g``: ALPN ``h2``) runs on
   memory BIOs (:class:`~.relay.Tls`) within ``timeouts.handshake``;
5. a PROXY v2 header goes first where the chosen instance's policy says ``pp``, then bytes are
   relayed (:mod:`.relay`) until either side closes, the idle watchdog (``timeouts.idle``, when
   ``data_timeout_enabled``) or ``timeouts.total`` ends it.

Steps 1-4 are callbacks on the socket's readiness (:class:`_Conn`), not a task per connection:
on this path a new connection's Python cost is a few calls, and most of its time is OpenSSL's
handshake. Its timeouts are deadlines that one periodic tick checks for all connections in
setup, rather than timers armed and cancelled for each. A server name's routing answer is kept
until the certificates change. Only a custom domain's DNS lookup and the gateway's own answers
run as tasks.

Every refusal closes the connection and is logged at debug level with the reason; nothing a
client sends can stop the others from being served. :attr:`ProxyServer.on_refused` lets tests
and stats see refusals.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import math
import os
import socket
import ssl
import time
from _socket import socket as _RawSocket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from pydstack.errors import DstackError

from . import ingress
from .app_address import AppAddressError, AppAddressResolver
from .certstore import CertStore, DomainCert
from .config import ProxyConfig
from .poller import ERR, IN, OUT, RDHUP, Poller
from .proxy_protocol import ProxyHeader, encode_v2, parse_proxy_header
from .relay import Relay, Tls
from .routes import Candidate, RouteError, RouteTable
from .sni import MAX_CLIENT_HELLO, ClientHello, parse_client_hello
from .special import InfoSource, SpecialProtocol

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
BACKLOG = 4096
#: the most bytes one read takes during a TLS handshake (a client's flight is a few KiB)
MAX_HANDSHAKE_READ = 16 * 1024
_ACCEPT_BATCH = 64
#: the most server names whose routing answer is kept
_SNI_CACHE = 4096


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
        #: connections between accept and relay, and the tasks of the rare paths
        self._conns: set[_Conn] = set()
        self._pending: set[asyncio.Task[None]] = set()
        self._listeners: list[socket.socket] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: Poller | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._ticker: asyncio.TimerHandle | None = None
        #: SNI -> (certificate, target) while the certificate set is that of `_sni_version`
        self._sni_cache: dict[str, tuple[DomainCert, ingress.IngressTarget]] = {}
        self._sni_version = -1
        t = config.timeouts
        # the setup deadlines (PROXY header, handshake, connect) are checked on a tick, not by a
        # timer per connection: a connection expires within an eighth of its timeout after it
        self._tick_every = min(max(min(t.pp_header, t.handshake, t.connect) / 8, 0.01), 0.5)
        self._sweep_every = max(t.idle / 4, 0.5)
        self._idle_sweeps = max(1, math.ceil(t.idle / self._sweep_every))

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, sockets: list[socket.socket] | None = None) -> list[tuple[str, int]]:
        """listen on `sockets` or on ``listen_addr`` × ``listen_ports``; the bound addresses."""
        self._loop = asyncio.get_running_loop()
        self._poller = Poller(self._loop)
        if sockets is None:
            sockets = [listen_socket(self.config.listen_addr, p) for p in self.config.listen_ports]
        for sock in sockets:
            sock.setblocking(False)
            # accepted sockets inherit both (Linux), at no system call per connection: Nagle
            # off, and delayed ACKs from the start, so the ClientHello's ACK rides on the
            # server's flight rather than leaving alone when the hello is peeked
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
            self._listeners.append(sock)
            self._loop.add_reader(sock.fileno(), self._accept_ready, sock)
        self._sweeper = self._loop.call_later(self._sweep_every, self._sweep)
        self._ticker = self._loop.call_later(self._tick_every, self._tick)
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
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for task in list(self._pending):
            task.cancel()
        for conn in list(self._conns):
            conn.abort()
        deadline = time.monotonic() + (self.config.timeouts.shutdown if grace is None else grace)
        while self.relays and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for relay in list(self.relays):
            relay.abort()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        if self._poller is not None:
            self._poller.close()
            self._poller = None

    # --- accept ---------------------------------------------------------------------------

    def _accept_ready(self, lsock: socket.socket) -> None:
        assert self._loop is not None
        family = lsock.family
        for _ in range(_ACCEPT_BATCH):
            try:
                # the C socket type, not socket.socket: its Python-level constructor, close and
                # properties are calls a new connection need not pay for
                fd, _addr = lsock._accept()  # type: ignore[attr-defined]  # CPython's, untyped
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept failed: %s", e.strerror)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            conn = _RawSocket(family, socket.SOCK_STREAM, 0, fd)
            conn.setblocking(False)
            self.stats.accepted += 1
            _Conn(self, conn).start()

    # --- per connection -------------------------------------------------------------------

    def _refuse(self, reason: str) -> None:
        self.stats.refused += 1
        key = reason.split(":", 1)[0]
        self.stats.by_reason[key] = self.stats.by_reason.get(key, 0) + 1
        log.debug("connection refused: %s", reason)
        if self.on_refused is not None:
            self.on_refused(reason)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _custom_domain(self, conn: _Conn, hello: ClientHello) -> None:
        """a SNI outside our domains: its app comes from DNS TXT, and it is passed through."""
        try:
            try:
                addr = await self.resolver.resolve(hello.sni)
            except AppAddressError as e:
                raise Refused(str(e)) from None
            try:
                candidates = self.table.resolve(addr.id, addr.port)
            except RouteError as e:
                raise Refused(str(e)) from None
        except Refused as e:
            conn.fail(str(e))
            return
        except asyncio.CancelledError:
            conn.abort()
            raise
        except Exception:
            log.exception("custom domain lookup failed")
            conn.fail("internal error")
            return
        conn._guard(functools.partial(conn.route_to, candidates, addr.port, None))

    async def _serve_special(self, sock: socket.socket, kind: str, ctx: ssl.SSLContext) -> None:
        """the gateway's own answers (``gateway``, ``health``) over the event loop's TLS."""
        assert self._loop is not None
        t = self.config.timeouts
        proto = SpecialProtocol(kind, self.app_info, self.acme_info)
        try:
            transport, _ = await self._loop.connect_accepted_socket(
                lambda: proto, sock, ssl=ctx, ssl_handshake_timeout=t.handshake
            )
        except asyncio.CancelledError:
            sock.close()
            raise
        except (OSError, ConnectionError) as e:  # ssl.SSLError is an OSError
            sock.close()
            self._refuse(f"{type(e).__name__}: {e}")
            return
        except Exception:
            sock.close()
            log.exception("special answer failed")
            self._refuse("internal error")
            return
        try:
            async with asyncio.timeout(t.handshake):
                await proto.done
        except TimeoutError:
            transport.abort()

    def _link(self, conn: _Conn) -> None:
        """both sides of `conn` are up: relay them (a PROXY v2 header first where the policy
        says so)."""
        loop = self._loop
        assert loop is not None and self._poller is not None
        chosen, client, backend = conn.chosen, conn.sock, conn.backend
        assert chosen is not None and backend is not None
        pp = b""
        if chosen.pp:
            pp = conn.pp or encode_v2(_addr(client.getpeername()), _addr(client.getsockname()))
        relay = Relay(
            loop,
            self._poller,
            client,
            backend,
            tls=conn.tls,
            chunk=self.config.buffer_size,
            shutdown_timeout=self.config.timeouts.shutdown,
            started=loop.time(),
            on_close=self._relay_closed,
        )
        self.relays.add(relay)
        self.stats.connections += 1
        if chosen.instance is not None:
            relay.instance_id = chosen.instance.instance_id
            self.table.conn_opened(relay.instance_id)
        relay.start(pp, client_mask=conn.mask(), backend_mask=conn.backend_mask)

    def _relay_closed(self, relay: Relay) -> None:
        if relay in self.relays:
            self.relays.discard(relay)
            self.stats.connections -= 1
        if relay.instance_id is not None:
            self.table.conn_closed(relay.instance_id)
            relay.instance_id = None

    # --- watchdogs ------------------------------------------------------------------------

    def _tick(self) -> None:
        """fail the connections whose setup deadline has passed."""
        loop = self._loop
        assert loop is not None
        now = loop.time()
        expired = [c for c in self._conns if c.expires(now)]
        for conn in expired:
            conn.fail("timeout")
        self._ticker = loop.call_later(self._tick_every, self._tick)

    def _route_sni(self, sni: str) -> tuple[DomainCert, ingress.IngressTarget] | None:
        """the certificate covering `sni` and what its name asks for; None outside our domains
        (a custom domain). IngressError for a name under our domains that the grammar refuses.
        Answers are kept per name until the certificates change: clients come back to the same
        names, and a name's answer depends on nothing else."""
        certs = self.certs
        cache = self._sni_cache
        if certs.version != self._sni_version:
            cache.clear()
            self._sni_version = certs.version
        hit = cache.get(sni)
        if hit is not None:
            return hit
        domain = certs.for_sni(sni)
        if domain is None:
            return None
        target = ingress.classify(sni, localhost_backend=self.config.insecure_localhost_backend)
        if len(cache) >= _SNI_CACHE:
            cache.clear()  # names never seen again (a scan) cost a refill, not memory
        cache[sni] = (domain, target)
        return domain, target

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


def _addr(addr: Any) -> tuple[str, int] | None:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[0]), int(addr[1])
    return None


def _idle() -> None:
    """the step of a connection whose setup is over."""


class _Conn:
    """one accepted connection until it is relayed, handed to a task or refused; driven by
    reader and writer callbacks and deadlines (:meth:`ProxyServer._tick`), so the common path
    creates no task, no coroutine and no timer.

    Steps: peek the PROXY header (``inbound_pp_enabled``) and consume it, peek the ClientHello,
    route; then the backend connects (all candidates at once, first wins) and, when terminating,
    the TLS handshake runs on memory BIOs (:class:`~.relay.Tls`: one read per flight from the
    client, one write per flight to it), each within its own timeout; when both are done
    :meth:`ProxyServer._link` relays them. Any failure closes everything this connection holds
    and counts one refusal.

    The client socket has one handler in the data plane's :class:`~.poller.Poller` from accept
    to relay (it runs the current :attr:`step`), and the relay takes the socket over as it is
    watched: a TLS connection costs three ``epoll_ctl`` (client in, backend out, backend in).
    """

    __slots__ = (
        "attempts",
        "backend",
        "backend_mask",
        "chosen",
        "connect_deadline",
        "deadline",
        "done",
        "fd",
        "hs_out",
        "loop",
        "lowat",
        "poller",
        "pp",
        "reading",
        "server",
        "sock",
        "step",
        "tls",
        "tls_done",
        "writing",
    )

    def __init__(self, server: ProxyServer, sock: _RawSocket) -> None:
        self.server = server
        loop = server._loop
        assert loop is not None
        self.loop = loop
        poller = server._poller
        assert poller is not None
        self.poller = poller
        self.sock = sock
        self.fd = sock.fileno()
        self.pp: bytes | None = None
        self.lowat = 1
        self.step: Callable[[], None] = self._peek_hello
        self.reading = False
        self.writing = False
        #: when the current setup step (PROXY header, handshake) times out (loop time)
        self.deadline: float | None = None
        #: when connecting to the backend times out
        self.connect_deadline: float | None = None
        self.attempts: dict[int, tuple[Candidate, _RawSocket]] = {}
        self.chosen: Candidate | None = None
        self.backend: _RawSocket | None = None
        #: what is watched on the connected backend socket (IN until the relay starts)
        self.backend_mask = 0
        self.tls: Tls | None = None
        #: True once the handshake is done and its last flight sent (None: sending it)
        self.tls_done: bool | None = True
        #: handshake bytes the socket did not take yet
        self.hs_out: memoryview | None = None
        self.done = False

    def start(self) -> None:
        server = self.server
        server._conns.add(self)
        t = server.config.timeouts
        if server.config.inbound_pp_enabled:
            self.step = self._peek_proxy_header
            self._set_deadline(t.pp_header)
        else:
            self._set_deadline(t.handshake)
        self.reading = True
        # the first bytes are often in by now: read them at once rather than a loop round
        # later (the client waits for the server's first flight meanwhile)
        self._guard(self.step)
        if not self.done:
            self.poller.set(self.fd, self.mask(), self._event)

    def mask(self) -> int:
        """what is watched on the client socket."""
        return (IN if self.reading else 0) | (OUT if self.writing else 0)

    def _event(self, ev: int) -> None:
        if ev & ERR:
            ev = self.mask()
        if ev & OUT and self.writing:
            self._guard(self._flush_handshake)
        elif ev & IN and self.reading:
            self._guard(self.step)

    def _guard(self, step: Callable[[], None]) -> None:
        """run a step; whatever it raises costs this connection only."""
        try:
            step()
        except Refused as e:
            self.fail(str(e))
        except (DstackError, OSError) as e:  # ssl.SSLError is an OSError
            self.fail(f"{type(e).__name__}: {e}")
        except Exception:
            log.exception("connection handler failed")
            self.fail("internal error")

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.poller.set(self.fd, self.mask(), self._event)

    def _write(self, on: bool) -> None:
        if on != self.writing:
            self.writing = on
            self.poller.set(self.fd, self.mask(), self._event)

    def _set_deadline(self, seconds: float) -> None:
        self.deadline = self.loop.time() + seconds

    def _clear_deadline(self) -> None:
        self.deadline = None

    def expires(self, now: float) -> bool:
        """whether a deadline of this connection has passed at `now`."""
        d, c = self.deadline, self.connect_deadline
        return (d is not None and now >= d) or (c is not None and now >= c)

    # --- the first bytes, read without consuming them ------------------------------------

    def _peek(self, limit: int, parse: Callable[[bytes], Any]) -> Any:
        """what `parse` makes of the bytes so far, or None to wait for more (raising SO_RCVLOWAT
        past what is buffered, so the next wake-up brings new bytes); Refused on EOF."""
        try:
            data = self.sock.recv(limit, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return None
        if not data or len(data) + 1 == self.lowat:
            raise Refused("connection closed before the client hello")
        try:
            result = parse(data)
        except DstackError as e:
            raise Refused(str(e)) from None
        if result is None:
            self.lowat = len(data) + 1
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, self.lowat)
        return result

    def _reset_lowat(self) -> None:
        if self.lowat != 1:
            self.lowat = 1
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    def _peek_proxy_header(self) -> None:
        got = self._peek(2048, parse_proxy_header)
        if got is None:
            return
        header, used = got
        self._reset_lowat()
        if len(self.sock.recv(used)) != used:
            raise Refused("proxy header vanished")
        assert isinstance(header, ProxyHeader)
        self.pp = header.to_v2()
        self._set_deadline(self.server.config.timeouts.handshake)
        self.step = self._peek_hello
        self._peek_hello()

    def _peek_hello(self) -> None:
        hello: ClientHello | None = self._peek(MAX_CLIENT_HELLO, parse_client_hello)
        if hello is None:
            return
        self._reset_lowat()
        self._route(hello)

    # --- routing --------------------------------------------------------------------------

    def _route(self, hello: ClientHello) -> None:
        server = self.server
        try:
            routed = server._route_sni(hello.sni)
        except ingress.IngressError as e:
            raise Refused(str(e)) from None
        if routed is None:
            self._park()
            server._spawn(server._custom_domain(self, hello))
            return
        domain, target = routed
        if target.kind in (ingress.Kind.GATEWAY, ingress.Kind.HEALTH):
            sock = self._hand_over()
            server._spawn(server._serve_special(sock, target.kind.value, domain.plain))
            return
        dest = target.dest
        if target.kind is ingress.Kind.LOCALHOST:
            candidates = [Candidate(None, server.localhost, False)]
        else:
            try:
                candidates = server.table.resolve(dest.id, dest.port)
            except RouteError as e:
                raise Refused(str(e)) from None
        if dest.mode is ingress.Mode.PASSTHROUGH:
            ctx = None
        else:
            ctx = domain.h2 if dest.mode is ingress.Mode.H2 else domain.plain
        self.route_to(candidates, dest.port, ctx)

    def _park(self) -> None:
        """no callbacks on the socket while a task works for this connection."""
        self._stop_reading()
        self._clear_deadline()

    def _hand_over(self) -> socket.socket:
        """the socket, for a task that owns it from now on (through the event loop's own
        watching, so it leaves the poller's set)."""
        self._park()
        self.poller.unwatch(self.fd)
        self._end()
        raw = self.sock
        # the event loop's transports want the socket module's class
        return socket.socket(raw.family, socket.SOCK_STREAM, 0, raw.detach())

    def route_to(self, candidates: list[Candidate], port: int, ctx: ssl.SSLContext | None) -> None:
        """connect to the candidates and, with `ctx`, terminate TLS meanwhile (raises as a
        step does: run it through :meth:`_guard` from outside a step)."""
        if self.done:
            return
        self.tls_done = ctx is None
        if ctx is None:
            # passthrough: the socket waits untouched until the relay reads it
            self._park()
        self._connect(candidates, port)
        if ctx is not None and not self.done:
            self._start_tls(ctx)

    # --- the backend ----------------------------------------------------------------------

    def _connect(self, candidates: list[Candidate], port: int) -> None:
        loop = self.loop
        error: OSError | None = None
        for c in candidates:
            family = socket.AF_INET6 if ":" in c.host else socket.AF_INET
            s = _RawSocket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                err = s.connect_ex((c.host, port))
            except OSError as e:
                s.close()
                error = e
                continue
            if err == 0:
                self._won(c, s)
                return
            if err != errno.EINPROGRESS:
                s.close()
                error = OSError(err, os.strerror(err))
                continue
            fd = s.fileno()
            self.attempts[fd] = (c, s)
            self.poller.set(fd, OUT, functools.partial(self._connected, fd))
        if not self.attempts:
            raise error or OSError("no backend answered")
        self.connect_deadline = loop.time() + self.server.config.timeouts.connect

    def _connected(self, fd: int, _ev: int) -> None:
        attempt = self.attempts.pop(fd, None)
        if attempt is None:
            return
        c, s = attempt
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.poller.forget(fd)
            s.close()
            if not self.attempts:
                e = OSError(err, os.strerror(err))  # the errno's subclass
                self.fail(f"{type(e).__name__}: {e}")
            return
        # watched for input until the relay takes it over (one change, no unregistering)
        self.backend_mask = IN
        self.poller.set(fd, IN | RDHUP, self._backend_early)
        self._won(c, s)

    def _backend_early(self, ev: int) -> None:
        """the backend speaks before the client's handshake is done: it waits in the socket."""
        if self.backend is not None and self.backend_mask:
            self.backend_mask = 0
            self.poller.set(self.backend.fileno(), 0, self._backend_early)

    def _won(self, c: Candidate, s: _RawSocket) -> None:
        """the first connected candidate; the others are dropped."""
        self._drop_attempts()
        self.connect_deadline = None
        self.chosen = c
        self.backend = s
        if self.tls_done:
            self._ready()

    def _drop_attempts(self) -> None:
        for fd, (_c, s) in self.attempts.items():
            self.poller.forget(fd)
            s.close()
        self.attempts.clear()

    # --- TLS termination ------------------------------------------------------------------

    def _start_tls(self, ctx: ssl.SSLContext) -> None:
        self.tls = Tls(ctx)
        self._set_deadline(self.server.config.timeouts.handshake)
        self.step = self._handshake_read
        self._handshake_read()  # the ClientHello is in the socket (peeked)

    def _handshake_read(self) -> None:
        try:
            data = self.sock.recv(MAX_HANDSHAKE_READ)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            raise Refused("connection closed during the tls handshake")
        tls = self.tls
        assert tls is not None
        tls.inc.write(data)
        try:
            tls.obj.do_handshake()
        except ssl.SSLWantReadError:
            self._send_handshake(tls.out.read())
            return
        except ssl.SSLError:
            with contextlib.suppress(OSError):
                self.sock.send(tls.out.read())  # the alert, so the client knows why
            raise
        self.tls_done = None  # done, once the last flight has left
        if tls.obj.version() == "TLSv1.3":
            # what is left to send are session tickets, which no client waits for: they stay in
            # the BIO and leave with the first bytes the relay sends (one packet fewer)
            self._send_handshake(b"")
        else:
            self._send_handshake(tls.out.read())  # TLS 1.2: the client waits for this flight

    def _send_handshake(self, out: bytes | memoryview) -> None:
        if self.hs_out is not None:
            out = bytes(self.hs_out) + out
            self.hs_out = None
        if out:
            try:
                n = self.sock.send(out)
            except (BlockingIOError, InterruptedError):
                n = 0
            if n < len(out):
                self.hs_out = memoryview(out)[n:]
                self._write(True)
                return
        self._write(False)
        if self.tls_done is None:
            self._handshake_done()

    def _flush_handshake(self) -> None:
        self._send_handshake(b"")

    def _handshake_done(self) -> None:
        self._clear_deadline()
        self.tls_done = True
        if self.backend is not None:
            self._ready()
        else:
            self.step = self._early

    def _early(self) -> None:
        """the client speaks before the backend is connected: it waits in the socket."""
        self._stop_reading()

    # --- the end of this stage ------------------------------------------------------------

    def _ready(self) -> None:
        if not self.done:
            self._guard(self._relay)

    def _relay(self) -> None:
        """hand both sockets to a relay; from here on they are not this connection's."""
        self.server._link(self)  # OSError: the client left (its address is gone)
        self._end()

    def _end(self) -> None:
        """this stage is over: out of the server's set, and the bound method in :attr:`step`
        no longer holds the object in a cycle, so it is freed at once rather than by the
        cyclic collector."""
        self.done = True
        self.server._conns.discard(self)
        self.step = _idle

    def fail(self, reason: str) -> None:
        """close all this connection holds and count one refusal; once."""
        if self.done:
            return
        self.abort()
        self.server._refuse(reason)

    def abort(self) -> None:
        """close all this connection holds, without counting a refusal (shutdown)."""
        if self.done:
            return
        self._end()  # out of the server's set: its deadlines are never looked at again
        self._drop_attempts()
        self.poller.forget(self.fd)
        self.sock.close()
        if self.backend is not None:
            self.poller.forget(self.backend.fileno())
            self.backend.close()
            self.backend = None
