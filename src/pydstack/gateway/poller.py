"""the data plane's own epoll set: one descriptor the event loop watches, many sockets in it.

uvloop turns every change of a descriptor's reader or writer into several system calls (libuv
stops and invalidates the whole poll handle, then registers it again, and creates a new handle,
with its own checks, once a descriptor has neither) and a KeyError raised and caught in Python.
A proxied connection changes them about a dozen times between accept and close. Here a change is
one ``epoll_ctl``, and none at all at close: the kernel drops a closed socket from the set.

:class:`Poller` keeps, per descriptor, the events asked for and a handler called with the events
that came (level-triggered). Events of one wake-up are dispatched in a batch; a descriptor
forgotten during the batch gets none of the rest of it, so a number reused by a new socket
within the batch never sees its predecessor's events. Handlers must tolerate a spurious wake-up
(a read that would block), as the loop's own readers must.
"""

from __future__ import annotations

import asyncio
import logging
import select
from collections.abc import Callable

log = logging.getLogger(__name__)

IN = select.EPOLLIN
OUT = select.EPOLLOUT
#: the peer has shut down its side (asked for with IN on backend sockets)
RDHUP = select.EPOLLRDHUP
#: what the kernel reports without being asked; a handler treats it as readable and writable
ERR = select.EPOLLERR | select.EPOLLHUP

Handler = Callable[[int], None]

_BATCH = 512


class Poller:
    """an epoll set read from `loop` (one reader on the set's descriptor)."""

    __slots__ = ("_dispatching", "_ep", "_handlers", "_loop", "_masks", "_stale")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ep = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._masks: dict[int, int] = {}
        self._stale: set[int] = set()
        self._dispatching = False
        loop.add_reader(self._ep.fileno(), self._ready)

    def set(self, fd: int, events: int, handler: Handler) -> None:
        """watch `fd` for `events` (``IN``, ``OUT`` or both) with `handler`; 0 stops watching it
        (the descriptor stays known until :meth:`forget`)."""
        old = self._masks.get(fd, 0)
        self._handlers[fd] = handler
        if events == old:
            return
        if events == 0:
            self._ep.unregister(fd)
        elif old == 0:
            self._ep.register(fd, events)
        else:
            self._ep.modify(fd, events)
        self._masks[fd] = events

    def handler(self, fd: int, handler: Handler) -> None:
        """hand `fd` (watched or not) to another handler, without a system call."""
        self._handlers[fd] = handler

    def forget(self, fd: int) -> None:
        """drop `fd` before it is closed (closing removes it from the kernel's set)."""
        self._handlers.pop(fd, None)
        self._masks.pop(fd, None)
        if self._dispatching:
            self._stale.add(fd)

    def unwatch(self, fd: int) -> None:
        """drop `fd` from the set now (for a descriptor that stays open)."""
        if self._masks.pop(fd, 0):
            self._ep.unregister(fd)
        self.forget(fd)

    def _ready(self) -> None:
        events = self._ep.poll(0, _BATCH)
        handlers = self._handlers
        stale = self._stale
        self._dispatching = True
        try:
            for fd, ev in events:
                if stale and fd in stale:
                    continue
                handler = handlers.get(fd)
                if handler is not None:
                    try:
                        handler(ev)
                    except Exception:
                        # a bug costs its own connection at most, never the others' events
                        log.exception("socket event handler failed")
        finally:
            self._dispatching = False
            stale.clear()

    def close(self) -> None:
        self._loop.remove_reader(self._ep.fileno())
        self._ep.close()
        self._handlers.clear()
        self._masks.clear()
