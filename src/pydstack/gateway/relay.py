"""the byte relay between a client socket (plain, or TLS through :class:`Tls`) and a backend
socket, driven by readiness events on the two descriptors.

No transports, protocols or tasks: one :class:`Relay` per proxied connection reads a chunk from
one socket and writes it to the other at once. Flow control is the kernel's: when the other
socket cannot take a whole chunk, the rest is held (one chunk at most per direction), reading
from the source stops and a writable event on the destination sends the rest, then reading
resumes. So a peer that does not read holds at most one chunk of memory here.

An EOF is passed on as a half-close (``shutdown(SHUT_WR)``) when both sockets are plain TCP;
otherwise (TLS) the whole connection closes. Reads of the backend also ask for ``EPOLLRDHUP``:
a backend that answers and closes at once has its last bytes and its EOF taken in one callback,
and with TLS the ``close_notify`` leaves in the same write as those bytes. Closing flushes
what is held, sends TLS ``close_notify`` and aborts after the shutdown timeout if the peer does
not drain.
:attr:`Relay.ticks` counts forwarded chunks for the idle watchdog.

TLS runs on memory BIOs (:class:`Tls`): OpenSSL never touches the socket, so one ``recv`` takes
every record that has arrived (OpenSSL's own socket reads take two system calls per record) and
a flight of records leaves in one ``send``. What one read leaves decrypted inside OpenSSL is
read on before the socket is read again.

The sockets are watched through the data plane's :class:`~.poller.Poller` (a change of what is
watched is one ``epoll_ctl``), and only on a change: a request and its answer cost two
callbacks and no system call beyond the reads and writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from _socket import socket as _RawSocket
from collections.abc import Callable
from typing import Protocol

from .poller import ERR, IN, OUT, RDHUP, Poller

#: the C socket type (``socket.socket`` is a subclass, so both are taken)
Sock = _RawSocket

_GONE = (OSError,)  # ssl.SSLError is an OSError


class _TlsObject(Protocol):
    """what the relay calls on a TLS session: the methods ``ssl.SSLObject`` and the C object
    beneath it share (``shutdown`` is ``SSLObject.unwrap``)."""

    def do_handshake(self) -> None: ...
    def read(self, size: int, /) -> bytes: ...
    def write(self, data: bytes | memoryview, /) -> int: ...
    def pending(self) -> int: ...
    def version(self) -> str | None: ...
    def shutdown(self) -> object: ...


class _Unwrapping:
    """``ssl.SSLObject`` seen as a :class:`_TlsObject`."""

    __slots__ = ("_obj",)

    def __init__(self, obj: ssl.SSLObject) -> None:
        self._obj = obj

    def do_handshake(self) -> None:
        self._obj.do_handshake()

    def read(self, size: int, /) -> bytes:
        return self._obj.read(size)

    def write(self, data: bytes | memoryview, /) -> int:
        return self._obj.write(data)

    def pending(self) -> int:
        return self._obj.pending()

    def version(self) -> str | None:
        return self._obj.version()

    def shutdown(self) -> object:
        self._obj.unwrap()
        return None


#: CPython's C session object is reachable (``SSLContext._wrap_bio``)
C_SESSIONS = hasattr(ssl.SSLContext, "_wrap_bio")


def _wrap(ctx: ssl.SSLContext, inc: ssl.MemoryBIO, out: ssl.MemoryBIO) -> _TlsObject:
    """a server-side TLS session on the two BIOs: CPython's C session object itself where it is
    there (``SSLObject`` only forwards each call to it, a Python call more per record and per
    handshake step), else the public ``SSLObject``."""
    if C_SESSIONS:
        wrap_c = ctx._wrap_bio  # type: ignore[attr-defined]  # CPython's, untyped
        obj: _TlsObject = wrap_c(inc, out, server_side=True, server_hostname=None)
        return obj
    return _Unwrapping(ctx.wrap_bio(inc, out, server_side=True))


class Tls:
    """a server-side TLS session on memory BIOs: bytes from the socket go into :attr:`inc`,
    bytes for the socket come out of :attr:`out`."""

    __slots__ = ("inc", "obj", "out", "shut")

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj: _TlsObject = _wrap(ctx, self.inc, self.out)
        #: the ``close_notify`` has been queued in :attr:`out`
        self.shut = False

    def shutdown(self) -> None:
        """queue the ``close_notify`` record in :attr:`out`, once (the peer's own is not
        waited for)."""
        if not self.shut:
            self.shut = True
            with contextlib.suppress(ssl.SSLError, ValueError):
                self.obj.shutdown()

    def close_notify(self) -> bytes:
        """what is left to send, ending with the ``close_notify`` record (empty when it has
        gone out already)."""
        self.shutdown()
        return self.out.read()


class Relay:
    """relays `client` ↔ `backend` (both connected, non-blocking) once :meth:`start` runs;
    `on_close` runs once when the connection ends."""

    __slots__ = (
        "_abort_timer",
        "_b_mask",
        "_c_held",
        "_c_mask",
        "_down",
        "_up",
        "b",
        "bfd",
        "c",
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
        "tls",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        poller: Poller,
        client: Sock,
        backend: Sock,
        *,
        tls: Tls | None = None,
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
        self.tls = tls
        self.chunk = chunk
        self.shutdown_timeout = shutdown_timeout
        self.started = started
        self.on_close = on_close
        #: bytes read from the client not yet taken by the backend, and the other way round
        self._up: bytes | memoryview | None = None
        self._down: bytes | memoryview | None = None
        #: what is watched on each socket (IN, OUT)
        self._c_mask = self._b_mask = 0
        #: the client is not read until it takes what its own reads made OpenSSL say
        self._c_held = False
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
            # reading the backend also asks whether it has closed: its last bytes and the EOF
            # are then taken in one callback (and, with TLS, leave with the close_notify)
            self.poller.set(self.bfd, mask | RDHUP if mask & IN else mask, self._backend_event)

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
            self._backend_readable(ev & RDHUP)

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
        tls = self.tls
        if tls is not None and (tls.inc.pending or tls.obj.pending()):
            # records the last read brought (or the handshake's): no readiness event comes
            self._decrypt(tls)

    def _recv(self, sock: Sock, size: int = 0) -> bytes | None:
        """a chunk (or `size` bytes) from `sock` (``b""`` at EOF); None when it would block or
        an error has aborted the relay."""
        try:
            return sock.recv(size or self.chunk)
        except (BlockingIOError, InterruptedError):
            return None
        except _GONE:
            self.abort()
            return None

    def _client_readable(self) -> None:
        data = self._recv(self.c)
        if data is None:
            return
        if not data:
            self._eof_from_client()
            return
        tls = self.tls
        if tls is None:
            self.ticks += 1
            self._to_backend(data)
            return
        tls.inc.write(data)
        self._decrypt(tls)

    def _decrypt(self, tls: Tls) -> None:
        """relay what OpenSSL can decrypt, while the backend takes it."""
        obj = tls.obj
        held = tls.out.pending  # session tickets wait for the next bytes to the client
        while self._up is None and not self.closed:
            try:
                data = obj.read(self.chunk)
            except ssl.SSLWantReadError:
                break
            except _GONE:  # a bad record (OpenSSL queued an alert)
                self._flush_tls(tls)
                self.abort()
                return
            if not data:  # close_notify
                self._eof_from_client()
                return
            self.ticks += 1
            self._to_backend(data)
            if not tls.inc.pending and not obj.pending():
                break  # all read: spare the exception of a read that finds nothing
        if tls.out.pending > held:  # what reading made OpenSSL say (a KeyUpdate answer)
            self._flush_tls(tls)

    def _flush_tls(self, tls: Tls) -> None:
        """send what reading the client made OpenSSL say. A client that does not take it is
        read no more until it does: otherwise a stream of KeyUpdate requests from a client
        that never reads would pile up answers here without end."""
        out = tls.out.read()
        if not out or self.finished:
            return
        if self._down is not None:
            self._down = bytes(self._down) + out
        else:
            n = self._send(self.c, out)
            if n < 0 or n == len(out):
                return
            self._hold_down(memoryview(out)[n:])
        self._c_held = True
        self._watch_client(IN, False)

    def _send(self, sock: Sock, data: bytes | memoryview) -> int:
        """the bytes `sock` took (0 when its write would block); -1 once an error has aborted
        the relay."""
        try:
            n = sock.send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except _GONE:
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
        elif not self._c_held:
            self._resume_client()

    def _eof_from_client(self) -> None:
        self._eof(True)

    # --- backend → client ------------------------------------------------------------------

    def _backend_readable(self, closed: int = 0) -> None:
        """read the backend; `closed` (its FIN has come) with a short read: the EOF is looked
        for at once, so the last bytes and the end go out together."""
        data = self._recv(self.b)
        if data is None:
            return
        if not data:
            self._eof_from_backend()
            return
        self.ticks += 1
        if closed and len(data) < self.chunk:
            rest = self._recv(self.b, self.chunk - len(data))  # at most one chunk in all
            if rest == b"":
                self._to_client(data, last=True)
                if not self.finished and self._down is None:
                    self._eof_from_backend()  # else read again once the client has it all
                return
            if rest:
                data += rest
            elif self.finished:
                return
        self._to_client(data)

    def _to_client(self, data: bytes | memoryview, *, last: bool = False) -> None:
        """send `data` to the client; `last` (the backend's last bytes): with TLS, the
        ``close_notify`` follows in the same write."""
        tls = self.tls
        if tls is not None:
            try:
                tls.obj.write(data)  # into the memory BIO: never blocks
                if last:
                    tls.shutdown()
            except _GONE:
                self.abort()
                return
            data = tls.out.read()
        n = self._send(self.c, data)
        if 0 <= n < len(data):
            self._hold_down(memoryview(data)[n:])

    def _hold_down(self, rest: bytes | memoryview) -> None:
        self._down = rest
        self._watch_backend(IN, False)
        self._watch_client(OUT, True)

    def _client_writable(self) -> None:
        data = self._down
        if data is None:
            self._watch_client(OUT, False)
            return
        n = self._send(self.c, data)
        if n < len(data):
            if n > 0:
                self._down = data[n:]
            return
        self._down = None
        self._watch_client(OUT, False)
        if self.closed:
            self._maybe_finish()
            return
        self._watch_backend(IN, True)
        if self._c_held:
            self._c_held = False
            if self._up is None:
                self._resume_client()

    def _eof_from_backend(self) -> None:
        self._eof(False)

    def _eof(self, from_client: bool) -> None:
        """an EOF read on one side: passed on as a half-close between plain sockets, and both
        EOFs end the relay; with TLS the whole connection ends (after flushing)."""
        if self.tls is not None:
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
        if notify and self.tls is not None:
            out = self.tls.close_notify()
            if out:
                with contextlib.suppress(OSError):
                    self.c.send(out)
        self.c.close()
        self.b.close()
