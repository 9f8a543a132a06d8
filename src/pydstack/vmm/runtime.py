"""what the VMM learns from a running CVM through the host API `Notify`.

`boot.progress`, `boot.error`, `shutdown.progress` set the VM's status fields; `instance.info`
persists the guest's instance identity into the host share (so a restart keeps the instance id);
everything is kept in a bounded event ring with millisecond timestamps. Payloads over 4096 bytes
are dropped, as upstream does.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from pydstack.types import hostshare as hs

from .workdir import VmWorkDir

log = logging.getLogger(__name__)
MAX_PAYLOAD = 4096


@dataclass(frozen=True)
class GuestEvent:
    event: str
    payload: str
    timestamp_ms: int


@dataclass
class VmRuntime:
    workdir: VmWorkDir
    boot_progress: str = ""
    boot_error: str = ""
    shutdown_progress: str = ""
    events: deque[GuestEvent] = field(default_factory=lambda: deque(maxlen=20))

    def notify(self, event: str, payload: str) -> None:
        if len(payload.encode()) > MAX_PAYLOAD:
            log.warning(
                "dropping %s notification from vm %s: payload too large", event, self.workdir.id
            )
            return
        self.events.append(GuestEvent(event, payload, int(time.time() * 1000)))
        if event == "boot.progress":
            self.boot_progress = payload
        elif event == "boot.error":
            self.boot_error = payload
        elif event == "shutdown.progress":
            self.shutdown_progress = payload
            if payload == "powering off":
                self.workdir.set_started(False)
        elif event == "instance.info":
            try:
                obj = json.loads(payload)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
                clean = {
                    k: str(obj.get(k, "")) for k in ("instance_id_seed", "instance_id", "app_id")
                }
                for v in clean.values():
                    bytes.fromhex(v)
            except ValueError as e:
                log.warning("vm %s sent invalid instance info: %s", self.workdir.id, e)
                return
            self.workdir.write_shared(hs.INSTANCE_INFO, json.dumps(clean).encode())
        else:
            log.info("vm %s: unknown guest event %s", self.workdir.id, event[:64])
