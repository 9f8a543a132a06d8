"""the VMM's task owner: close() cancels every background task and returns only once each has
finished, so nothing is left pending when the loop goes away."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pydstack.vmm.tasks import TaskOwner


async def test_close_waits_for_each_task_to_finish_its_cancellation():
    owner = TaskOwner()
    started, cancelled, unwind = asyncio.Event(), asyncio.Event(), asyncio.Event()
    finished = []

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            await unwind.wait()  # cleanup that takes a while (a process to reap, a dir to drop)
            finished.append("work")
            raise

    task = owner.spawn(work(), name="work")
    await started.wait()
    closing = asyncio.create_task(owner.close())
    await cancelled.wait()
    assert not closing.done()  # still waiting for the task's cleanup
    unwind.set()
    await closing
    assert finished == ["work"] and task.cancelled() and len(owner) == 0
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


async def test_a_failed_task_is_logged_and_forgotten(caplog):
    owner = TaskOwner()

    async def boom() -> None:
        raise OSError("disk gone")

    task = owner.spawn(boom(), name="remove x")
    with caplog.at_level(logging.ERROR, logger="dstack-vmm"), pytest.raises(OSError):
        await task
    assert len(owner) == 0 and "background task remove x failed" in caplog.text
    await owner.close()


async def test_nothing_starts_after_close():
    owner = TaskOwner()
    await owner.close()
    coro = asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="cannot start late: the task owner is closed"):
        owner.spawn(coro, name="late")
    assert coro.cr_frame is None  # closed, not left never-awaited
    assert owner.closed and len(owner) == 0
