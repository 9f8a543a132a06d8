"""one VM as the VMM holds it in memory: its directory, manifest, guest-reported runtime state,
the simulated TD of its current boot, its host-API server and the supervisor's bookkeeping.

What must survive a VMM restart is on disk: the manifest and desired state (`workdir`), and the
last boot's progress and exit time in `.vmm-runtime.json` (:func:`save_runtime`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

from pydstack.rpc.server import PrpcServer

from .runtime import VmRuntime
from .td import VmTd
from .workdir import VmManifest, VmWorkDir, atomic_write

RUNTIME_FILE = ".vmm-runtime.json"


@dataclass
class Vm:
    workdir: VmWorkDir
    manifest: VmManifest
    runtime: VmRuntime
    #: wall-clock time the current (or last) boot started, 0 if never
    started_at: float = 0.0
    #: wall-clock time the CVM was last seen to stop (stopped, crashed, powered off), 0 if never
    exited_at: float = 0.0
    #: the CVM was running when last looked at (so an exit is noticed, and timed, once)
    alive: bool = False
    removing: bool = False
    restart_attempts: int = 0
    next_restart: float = 0.0
    host_api: PrpcServer | None = None
    #: the simulated TD of this boot, held here as the TDX module would hold it
    td: VmTd | None = None

    @property
    def id(self) -> str:
        return self.manifest.id


def save_runtime(vm: Vm) -> None:
    """persist what the guest reported and when the CVM last exited (best effort)."""
    r = vm.runtime
    data = {
        "boot_progress": r.boot_progress,
        "boot_error": r.boot_error,
        "shutdown_progress": r.shutdown_progress,
        "exited_at": vm.exited_at,
    }
    with contextlib.suppress(OSError):
        atomic_write(vm.workdir.path / RUNTIME_FILE, json.dumps(data).encode())


def load_runtime(vm: Vm, *, running: bool) -> None:
    """restore the last exit time, and for a CVM still running its boot progress (a stopped
    one starts its next boot afresh). A missing or malformed file restores nothing."""
    with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
        saved = json.loads((vm.workdir.path / RUNTIME_FILE).read_text())
        vm.exited_at = float(saved.get("exited_at", 0.0) or 0.0)
        if running:
            vm.runtime.boot_progress = str(saved.get("boot_progress", ""))
            vm.runtime.boot_error = str(saved.get("boot_error", ""))
            vm.runtime.shutdown_progress = str(saved.get("shutdown_progress", ""))


def status_of(vm: Vm, running: bool) -> str:
    """upstream's status words: `removing`, else from (desired started, process running)."""
    if vm.removing:
        return "removing"
    if vm.workdir.started():
        return "running" if running else "exited"
    return "stopping" if running else "stopped"
