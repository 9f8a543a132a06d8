"""the byte relay between a client transport and a backend transport (asyncio Protocols).

One :class:`Relay` per proxied connection joins two :class:`Side` protocols: bytes received on
one side are written to the other as they come, with flow control (a side whose write buffer is
above its high-water mark pauses reading on the other side). Bytes that arrive before both sides
exist are held (and reading paused) until :meth:`Relay.link`. An EOF is passed on as a half-close
where the other transport can (plain TCP); otherwise (TLS) the whole connection closes after
flushing. Closing flushes what is buffered and aborts a transport that has not drained within
the shutdown timeout. :attr:`Relay.ticks` counts forwarded chunks for the idle watchdog.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

#: the least pause mark of a TLS side's writes (uvloop reads in chunks of up to 256 KiB)
TLS_WRITE_HIGH_WATER = 256 * 1024


class Side(asyncio.Protocol):
    """one end of a relay (the client's or the backend's transport)."""

    __slots__ = ("out", "paused_by_link", "pending", "relay", "transport")

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: Any = None
        self.out: Any = None
        self.pending: list[bytes] | None = None
        self.paused_by_link = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.relay.closed:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        out = self.out
        if out is not None:
            out.write(data)
            self.relay.ticks += 1
            return
        if self.pending is None:
            self.pending = []
        self.pending.append(data)
        if not self.paused_by_link:
            self.paused_by_link = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        return self.relay.eof_from(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.lost(self)

    def pause_writing(self) -> None:
        other = self.relay.other(self)
        if other is not None and other.transport is not None:
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.relay.other(self)
        if other is not None and other.transport is not None and not other.paused_by_link:
            other.transport.resume_reading()


class Relay:
    """a client side and a backend side; `on_close` runs once when the connection ends."""

    __slots__ = (
        "backend",
        "client",
        "closed",
        "eofs",
        "high_water",
        "idle_sweeps",
        "instance_id",
        "on_close",
        "seen_ticks",
        "shutdown_timeout",
        "started",
        "ticks",
    )

    def __init__(
        self,
        *,
        high_water: int,
        shutdown_timeout: float,
        started: float,
        on_close: Callable[[Relay], None],
    ) -> None:
        self.client = Side(self)
        self.backend = Side(self)
        self.closed = False
        self.eofs = 0
        self.ticks = 0
        self.seen_ticks = -1
        self.idle_sweeps = 0
        self.started = started
        self.high_water = high_water
        self.shutdown_timeout = shutdown_timeout
        self.on_close = on_close
        #: the instance whose connection counter this relay holds (app routes only)
        self.instance_id: str | None = None

    def other(self, side: Side) -> Side | None:
        return self.backend if side is self.client else self.client

    def link(self, first_to_backend: bytes = b"") -> None:
        """join the two transports (both connected): send `first_to_backend` (a PROXY header),
        then whatever either side sent early, then relay."""
        if self.closed:
            return
        c, b = self.client, self.backend
        for side in (c, b):
            high = self.high_water
            if side.transport.get_extra_info("ssl_object") is not None:
                # a TLS transport keeps plaintext until it is sealed into records; with its
                # pause mark below one read of the other side (the loop reads up to 256 KiB),
                # every read would pause the other side and the pipe would run dry
                high = max(high, TLS_WRITE_HIGH_WATER)
            side.transport.set_write_buffer_limits(high=high)
        if first_to_backend:
            b.transport.write(first_to_backend)
        c.out = b.transport
        b.out = c.transport
        for src, dst in ((c, b), (b, c)):
            if src.pending:
                for chunk in src.pending:
                    dst.transport.write(chunk)
                src.pending = None
            if src.paused_by_link:
                src.paused_by_link = False
                src.transport.resume_reading()

    def eof_from(self, side: Side) -> bool:
        other = self.other(side)
        transport = other.transport if other is not None else None
        if transport is None or other is None or other.out is None:
            self.close()
            return False
        try:
            can_half_close = transport.can_write_eof() and side.transport.can_write_eof()
        except (AttributeError, NotImplementedError):
            can_half_close = False
        if not can_half_close:
            self.close()
            return False
        transport.write_eof()
        self.eofs += 1
        if self.eofs >= 2:
            self.close()
            return False
        return True

    def lost(self, side: Side) -> None:
        self.close()

    def close(self) -> None:
        """flush and close both transports (once); abort one still holding bytes after the
        shutdown timeout."""
        if self.closed:
            return
        self.closed = True
        for side in (self.client, self.backend):
            t = side.transport
            if t is None or t.is_closing():
                continue
            if t.get_write_buffer_size() > 0:
                asyncio.get_running_loop().call_later(self.shutdown_timeout, t.abort)
            t.close()
        self.on_close(self)

    def abort(self) -> None:
        """drop both transports at once (timeouts)."""
        for side in (self.client, self.backend):
            if side.transport is not None:
                side.transport.abort()
        self.close()
