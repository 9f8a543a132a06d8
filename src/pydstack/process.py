"""what every long-running pydstack process shares: stopping on SIGINT and SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal


def stop_signal() -> asyncio.Event:
    """an event set by SIGINT or SIGTERM (call inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop
