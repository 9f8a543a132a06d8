"""what every long-running pydstack process shares: its event loop, and stopping on SIGINT and
SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def stop_signal() -> asyncio.Event:
    """an event set by SIGINT or SIGTERM (call inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop


def run_server(main: Coroutine[Any, Any, T]) -> T:
    """run a server process's main coroutine on uvloop (its transports and timers cost a third
    of asyncio's on the hot paths)."""
    import uvloop

    return uvloop.run(main)
