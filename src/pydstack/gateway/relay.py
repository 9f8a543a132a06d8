"""the byte relay between a client socket (plain, or TLS as an :class:`ssl.SSLSocket`) and a
backend socket, driven by the event loop's reader and writer callbacks on the two descriptors.

No transports, protocols or tasks: one :class:`Relay` per proxied connection reads a chunk from
one socket and writes it to the other at once. Flow control is the kernel's: when the other
socket cannot take a whole chunk, the rest is held (one chunk at most per direction), reading
from the source stops and a writer callback on the destination sends the rest, then reading
resumes. So a peer that does not read holds at most one chunk of memory here.

An EOF is passed on as a half-close (``shutdown(SHUT_WR)``) when both sockets are plain TCP;
otherwise (TLS) the whole connection closes. Closing flushes what is held, sends TLS
``close_notify`` and aborts after the shutdown timeout if the peer does not drain.
:attr:`Relay.ticks` counts forwarded chunks for the idle watchdog.

OpenSSL decrypts one record per read; a TLS record larger than the read buffer leaves bytes
inside OpenSSL that no readiness event announces, so reading goes on while
:meth:`ssl.SSLSocket.pending` says so. A TLS read that must first write (a KeyUpdate answer)
waits for the client socket to be writable. Renegotiation is off in the gateway's contexts, so a
TLS write never has to read.

The sockets are watched through the data plane's :class:`~.poller.Poller` (a change of what is
watched is one ``epoll_ctl``), and only on a change: a request and its answer cost two
callbacks and no system call beyond the reads and writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable

from .poller import ERR, IN, OUT, Poller

Sock = socket.socket  # an ssl.SSLSocket is one too

_GONE = (OSError,)  # ssl.SSLError is an OSError


class Relay:
    """relays `client` ↔ `backend` (both connected, non-blocking) once :meth:`start` runs;
    `on_close` runs once when the connection ends."""

    __slots__ = (
        "_abort_timer",
        "_b_mask",
        "_c_mask",
        "_c_read_wants_write",
        "_down",
        "_up",
        "b",
        "bfd",
        "c",
        "c_tls",
        "cfd",
        "chunk",
        "closed",
        "eofs",
        "finished",
        "idle_sweeps",
        "instance_id",
        "loop",
        "on_close",
        "poller",
        "seen_ticks",
        "shutdown_timeout",
        "started",
        "ticks",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        poller: Poller,
        client: Sock,
        backend: Sock,
        *,
        chunk: int,
        shutdown_timeout: float,
        started: float,
        on_close: Callable[[Relay], None],
    ) -> None:
        self.loop = loop
        self.poller = poller
        self.c = client
        self.b = backend
        self.cfd = client.fileno()
        self.bfd = backend.fileno()
        self.c_tls = isinstance(client, ssl.SSLSocket)
        self.chunk = chunk
        self.shutdown_timeout = shutdown_timeout
        self.started = started
        self.on_close = on_close
        #: bytes read from the client not yet taken by the backend, and the other way round
        self._up: bytes | memoryview | None = None
        self._down: bytes | memoryview | None = None
        #: what is watched on each socket (IN, OUT)
        self._c_mask = self._b_mask = 0
        self._c_read_wants_write = False
        self._abort_timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.finished = False
        self.eofs = 0
        self.ticks = 0
        self.seen_ticks = -1
        self.idle_sweeps = 0
        #: the instance whose connection counter this relay holds (app routes only)
        self.instance_id: str | None = None

    # --- what is watched -------------------------------------------------------------------

    def _watch(self, client: bool, bit: int, on: bool) -> None:
        """watch for (or stop watching for) `bit` on the client's or the backend's socket."""
        old = self._c_mask if client else self._b_mask
        mask = old | bit if on else old & ~bit
        if mask == old:
            return
        if client:
            self._c_mask = mask
            self.poller.set(self.cfd, mask, self._client_event)
        else:
            self._b_mask = mask
            self.poller.set(self.bfd, mask, self._backend_event)

    def _watch_client(self, bit: int, on: bool) -> None:
        self._watch(True, bit, on)

    def _watch_backend(self, bit: int, on: bool) -> None:
        self._watch(False, bit, on)

    def _client_event(self, ev: int) -> None:
        if ev & ERR:
            ev = self._c_mask  # the read or write that follows meets the error
        if ev & OUT and self._c_mask & OUT:
            self._client_writable()
        if ev & IN and self._c_mask & IN:
            self._client_readable()

    def _backend_event(self, ev: int) -> None:
        if ev & ERR:
            ev = self._b_mask
        if ev & OUT and self._b_mask & OUT:
            self._backend_writable()
        if ev & IN and self._b_mask & IN:
            self._backend_readable()

    # --- start -----------------------------------------------------------------------------

    def start(
        self, first_to_backend: bytes = b"", *, client_mask: int = 0, backend_mask: int = 0
    ) -> None:
        """send `first_to_backend` (a PROXY header), then relay both ways. `client_mask` and
        `backend_mask` say what the caller left watched on the sockets; the relay takes them
        over."""
        self._c_mask = client_mask
        self._b_mask = backend_mask
        self.poller.handler(self.cfd, self._client_event)
        self.poller.handler(self.bfd, self._backend_event)
        if first_to_backend:
            self._to_backend(first_to_backend)
            if self.finished:
                return
        if self._up is None:
            self._resume_client()
        self._watch_backend(IN, True)

    # --- client → backend ------------------------------------------------------------------

    def _resume_client(self) -> None:
        self._watch_client(IN, True)
        if self.c_tls and self.c.pending():  # type: ignore[attr-defined]
            # a record OpenSSL holds decrypted (left by a short read): no readiness event comes
            self._client_readable()

    def _client_readable(self) -> None:
        c = self.c
        while True:
            try:
                data = c.recv(self.chunk)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return
            except ssl.SSLWantWriteError:
                self._c_read_wants_write = True
                self._watch_client(IN, False)
                self._watch_client(OUT, True)
                return
            except _GONE:
                self.abort()
                return
            if not data:
                self._eof_from_client()
                return
            self.ticks += 1
            self._to_backend(data)
            if not self._c_mask & IN or not self.c_tls or not c.pending():  # type: ignore[attr-defined]
                return

    def _send(self, sock: Sock, data: bytes | memoryview) -> int:
        """the bytes `sock` took: all of them from a TLS socket, or 0 when its write would
        block (OpenSSL then keeps its place: the retry must offer the same bytes); -1 once an
        error has aborted the relay."""
        try:
            n = sock.send(data)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
            return 0
        except _GONE:  # SSLWantReadError included: renegotiation is off
            self.abort()
            return -1
        return n

    def _to_backend(self, data: bytes | memoryview) -> None:
        n = self._send(self.b, data)
        if 0 <= n < len(data):
            self._up = memoryview(data)[n:]
            self._watch_client(IN, False)
            self._watch_backend(OUT, True)

    def _backend_writable(self) -> None:
        data = self._up
        if data is None:
            self._watch_backend(OUT, False)
            return
        n = self._send(self.b, data)
        if n < len(data):
            if n > 0:
                self._up = data[n:]
            return
        self._up = None
        self._watch_backend(OUT, False)
        if self.closed:
            self._maybe_finish()
        else:
            self._resume_client()

    def _eof_from_client(self) -> None:
        self._eof(True)

    # --- backend → client ------------------------------------------------------------------

    def _backend_readable(self) -> None:
        try:
            data = self.b.recv(self.chunk)
        except (BlockingIOError, InterruptedError):
            return
        except _GONE:
            self.abort()
            return
        if not data:
            self._eof_from_backend()
            return
        self.ticks += 1
        self._to_client(data)

    def _to_client(self, data: bytes | memoryview) -> None:
        n = self._send(self.c, data)
        if n == 0 and self.c_tls:
            self._hold_down(data)  # the very same bytes, for OpenSSL's retry
        elif 0 <= n < len(data):
            self._hold_down(memoryview(data)[n:])

    def _hold_down(self, rest: bytes | memoryview) -> None:
        self._down = rest
        self._watch_backend(IN, False)
        self._watch_client(OUT, True)

    def _client_writable(self) -> None:
        if self._c_read_wants_write:
            self._c_read_wants_write = False
            if self._down is None:
                self._watch_client(OUT, False)
            if not self.closed and self._up is None:
                self._resume_client()
        data = self._down
        if data is None:
            return
        n = self._send(self.c, data)
        if n < len(data):
            if n > 0:  # a plain socket took part (TLS takes all or nothing)
                self._down = memoryview(data)[n:]
            return
        self._down = None
        if not self._c_read_wants_write:
            self._watch_client(OUT, False)
        if self.closed:
            self._maybe_finish()
        else:
            self._watch_backend(IN, True)

    def _eof_from_backend(self) -> None:
        self._eof(False)

    def _eof(self, from_client: bool) -> None:
        """an EOF read on one side: passed on as a half-close between plain sockets, and both
        EOFs end the relay; with TLS the whole connection ends (after flushing)."""
        if self.c_tls:
            self.close()
            return
        self._watch(from_client, IN, False)
        with contextlib.suppress(OSError):
            (self.b if from_client else self.c).shutdown(socket.SHUT_WR)
        self.eofs += 1
        if self.eofs >= 2:
            self.close()

    # --- the end ---------------------------------------------------------------------------

    def close(self) -> None:
        """stop reading, flush what is held (abort if it has not drained within the shutdown
        timeout), then close both sockets; once."""
        if self.closed:
            return
        self.closed = True
        self.on_close(self)
        if self._up is None and self._down is None:
            self._finish()
            return
        self._watch_client(IN, False)
        self._watch_backend(IN, False)
        self._abort_timer = self.loop.call_later(self.shutdown_timeout, self.abort)

    def _maybe_finish(self) -> None:
        if self._up is None and self._down is None:
            self._finish()

    def abort(self) -> None:
        """drop both sockets at once (errors, timeouts)."""
        self._up = self._down = None
        if not self.closed:
            self.closed = True
            self.on_close(self)
        self._finish(notify=False)

    def _finish(self, *, notify: bool = True) -> None:
        if self.finished:
            return
        self.finished = True
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        # closing drops the sockets from the kernel's set
        self.poller.forget(self.cfd)
        self.poller.forget(self.bfd)
        if notify and self.c_tls:
            send_close_notify(self.c)
        self.c.close()
        self.b.close()


def send_close_notify(sock: Sock) -> None:
    """one non-blocking attempt at TLS ``close_notify`` (the peer's own is not waited for)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sock.unwrap()  # type: ignore[attr-defined]
