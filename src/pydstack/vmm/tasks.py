"""background tasks with an owner: whoever spawns them cancels and awaits them on close.

`spawn` starts a task and keeps it until it ends; a task that fails is logged (it has nobody
else to report to). `close` refuses new tasks, cancels every running one and waits until all
have finished, so nothing is left pending when the event loop goes away.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("dstack-vmm")


class TaskOwner:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def closed(self) -> bool:
        return self._closed

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """run `coro` in the background; RuntimeError once closed (the coroutine is closed
        unstarted, so it is not left un-awaited)."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"cannot start {name}: the task owner is closed")
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    async def close(self) -> None:
        """cancel every task and wait for them all to end (their errors are logged)."""
        self._closed = True
        while self._tasks:
            pending = list(self._tasks)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self._tasks.difference_update(pending)
