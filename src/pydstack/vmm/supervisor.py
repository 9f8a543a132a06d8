"""auto-restart: a VM whose desired state is started but whose CVM is gone is started again,
with exponential backoff (`[cvm.auto_restart]`: first after `initial_backoff`, then doubling up
to `max_backoff`, at most `max_retries` times; the count resets after `reset_window` seconds of
healthy running). Each restart is a `vmm.auto_restart` event on the VM, the last one also a
`vmm.auto_restart.exhausted` event. A stop or a guest power-off clears the desired state, so
neither is restarted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import VmmError

if TYPE_CHECKING:
    from .app import VmmApp

log = logging.getLogger("dstack-vmm")
#: the loop looks at least this often, whatever `interval` says
MAX_TICK = 1.0


class AutoRestart:
    def __init__(self, app: VmmApp, clock: Callable[[], float] = time.time) -> None:
        self.app = app
        self.clock = clock

    async def run(self) -> None:
        """tick forever (until cancelled)."""
        interval = min(self.app.config.auto_restart_interval, MAX_TICK)
        while True:
            await asyncio.sleep(interval)
            await self.tick()

    async def tick(self) -> None:
        """one look at every VM: schedule a restart for a newly dead one, start those due."""
        c = self.app.config
        now = self.clock()
        for vm in list(self.app.vms.values()):
            if vm.removing or not vm.workdir.started():
                vm.restart_attempts = 0
                vm.next_restart = 0.0
                continue
            if self.app.is_running(vm):
                if vm.restart_attempts and now - vm.started_at > c.auto_restart_reset_window:
                    vm.restart_attempts = 0
                continue
            if vm.next_restart == 0.0:
                if vm.restart_attempts >= c.auto_restart_max_retries:
                    continue
                delay = min(
                    c.auto_restart_initial_backoff * (2**vm.restart_attempts),
                    c.auto_restart_max_backoff,
                )
                vm.next_restart = now + delay
                log.info("vm %s exited; restarting in %.0f s", vm.id, delay)
                continue
            if now < vm.next_restart:
                continue
            vm.next_restart = 0.0
            vm.restart_attempts += 1
            error = vm.runtime.boot_error
            try:
                await self.app.start_vm(vm.id)
            except (VmmError, OSError) as e:
                log.error("auto-restart of vm %s failed: %s", vm.id, e)
                continue
            vm.runtime.notify("vmm.auto_restart", f"attempt {vm.restart_attempts}: {error}"[:1024])
            if vm.restart_attempts == c.auto_restart_max_retries:
                vm.runtime.notify("vmm.auto_restart.exhausted", error[:1024])
