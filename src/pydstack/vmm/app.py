"""the VMM's VM registry and CVM lifecycle (create, start, stop, shutdown, remove, reload).

There is no database: each VM is its directory under `run_path` (manifest, desired state, host
share). How a CVM runs is the backend's business (:mod:`.backends`); a running CVM outlives the
VMM and is found again at its next start. Background work (removals, the auto-restart loop) is
owned by the app and cancelled and awaited by :meth:`VmmApp.close`; an interrupted removal is
finished at the next start (`.removing`).

Every refusal is a :mod:`.errors` domain error whose message the caller sees; a refused request
changes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from pydstack.rpc.client import PrpcClient
from pydstack.rpc.errors import RpcError
from pydstack.rpc.proto import vmm_rpc_pb2 as pb
from pydstack.types import hostshare as hs

from . import hostshare, logrotate, updates
from .admission import Admission
from .backends import BootSpec, CvmBackend, make_backend
from .config import VmmConfig
from .errors import GuestUnavailable, InvalidState, Refused, VmmError, VmNotFound
from .hostapi import serve_host_api
from .images import Image, ImageCatalog
from .runtime import VmRuntime
from .supervisor import AutoRestart
from .tasks import TaskOwner
from .td import STATE_FILE as TD_STATE_FILE
from .td import TdIdentity, VmTd, stored_seed
from .vm import Vm, load_runtime, save_runtime, status_of
from .vminfo import vm_info
from .workdir import VmWorkDir, WorkDirError, spread_subdirectories

log = logging.getLogger("dstack-vmm")
M = TypeVar("M", bound=Message)
#: how long StopVm lets the guest stop before the CVM is killed
STOP_GRACE = 3.0


class VmmApp:
    def __init__(
        self,
        config: VmmConfig,
        backend: CvmBackend | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.backend = backend if backend is not None else make_backend(config)
        self.clock = clock
        self.vms: dict[str, Vm] = {}
        self.admission = Admission(config, self.backend, self.vms)
        self._images = ImageCatalog(config.image_path, self.backend.capabilities.image_kinds)
        self.tasks = TaskOwner()
        self.supervisor = AutoRestart(self, clock)
        self._lock = asyncio.Lock()
        self.seed = b""

    # ------------------------------------------------------------------ start and close
    async def start(self) -> None:
        c = self.config
        c.run_path.mkdir(parents=True, exist_ok=True)
        spread_subdirectories(c.run_path)
        self.seed = stored_seed(c.mock_attestation_seed, c.mock_attestation_seed_file, c.run_path)
        await self.backend.prepare()
        await self.reload()
        if c.auto_restart_enabled:
            self.tasks.spawn(self.supervisor.run(), name="auto-restart")
        if self.backend.capabilities.boot_timeout:
            self.tasks.spawn(self._boot_watchdog(), name="boot-watchdog")

    async def close(self) -> None:
        """cancel and await background work, stop serving host APIs; CVMs keep running."""
        await self.tasks.close()
        for vm in self.vms.values():
            if vm.host_api is not None:
                await vm.host_api.close()
                vm.host_api = None
        await self.backend.close()

    def images(self) -> dict[str, Image]:
        return self._images.get()

    # ------------------------------------------------------------------ registry
    def get(self, vm_id: str) -> Vm:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise VmNotFound(vm_id)
        return vm

    def is_running(self, vm: Vm) -> bool:
        """whether the CVM runs; the first look after it stopped records its exit time, and a
        CVM that ended during its boot unasked, with no error of its own, gets one (with what
        its process last said)."""
        alive = self.backend.is_alive(vm)
        if vm.alive and not alive:
            vm.exited_at = self.clock()
            r = vm.runtime
            if vm.workdir.started() and r.boot_progress != "done" and not r.boot_error:
                detail = self.backend.exit_detail(vm)
                r.notify(
                    "boot.error",
                    f"the cvm exited during boot (at {r.boot_progress or 'start'!r})"
                    + (f": {detail}" if detail else "; see its serial log"),
                )
            save_runtime(vm)
        vm.alive = alive
        return alive

    async def check_boot_timeouts(self) -> None:
        """a CVM still booting past the backend's boot_timeout gets a boot error and is stopped
        (a started one is then restarted with backoff, when auto-restart is on)."""
        limit = self.backend.capabilities.boot_timeout
        if not limit:
            return
        now = self.clock()
        for vm in list(self.vms.values()):
            r = vm.runtime
            if vm.removing or not vm.alive or r.boot_progress == "done" or r.boot_error:
                continue
            if vm.started_at and now - vm.started_at > limit:
                r.notify(
                    "boot.error",
                    f"the cvm did not boot in {limit:.0f} s (at {r.boot_progress!r}); "
                    "see its serial log",
                )
                save_runtime(vm)
                log.error("vm %s did not boot in %.0f s; stopping it", vm.id, limit)
                await self._halt(vm, 0.0)

    async def _boot_watchdog(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self.check_boot_timeouts()

    def status_of(self, vm: Vm) -> str:
        return status_of(vm, self.is_running(vm))

    def vm_infos(self, vms: list[Vm], brief: bool = False) -> list[pb.VmInfo]:
        """VmInfo of many VMs (Status): the image catalog is looked at once, not per VM."""
        images = self.images()
        return [self.vm_info(vm, brief, images=images) for vm in vms]

    def vm_info(
        self, vm: Vm, brief: bool = False, *, images: dict[str, Image] | None = None
    ) -> pb.VmInfo:
        image = (images if images is not None else self.images()).get(vm.manifest.image)
        return vm_info(
            vm,
            status=self.status_of(vm),
            image_version=image.version if image else "",
            interfaces=self.backend.interfaces(vm),
            now=self.clock(),
            brief=brief,
        )

    def save_runtime(self, vm: Vm) -> None:
        save_runtime(vm)

    async def _load(self, wd: VmWorkDir) -> Vm:
        manifest = wd.manifest()
        runtime = VmRuntime(wd)
        runtime.events = type(runtime.events)(maxlen=self.config.event_buffer_size)
        vm = Vm(wd, manifest, runtime, removing=wd.removing)
        self.backend.attach(vm)
        try:
            vm.alive = self.backend.is_alive(vm)
            load_runtime(vm, running=vm.alive)
            if vm.alive:
                proc = self.backend.process(vm)
                vm.started_at = proc.started_at if proc else self.clock()
                if manifest.simulated_tee:
                    try:
                        vm.td = VmTd.resume(self.seed, wd.path / TD_STATE_FILE)
                    except (OSError, ValueError, KeyError) as e:
                        log.error("cannot resume the td of running vm %s: %s", manifest.id, e)
            self.vms[manifest.id] = vm
            channel = self.backend.host_api_channel(vm)
            vm.host_api = await serve_host_api(vm, channel, self.config.server_limits, save_runtime)
        except BaseException:
            self.vms.pop(manifest.id, None)
            self.backend.detach(vm)
            raise
        return vm

    async def _forget(self, vm: Vm) -> None:
        """drop `vm` from the VMM: its CVM stopped, its host left clean, its host API closed."""
        await self._halt(vm, 0.0)
        if vm.host_api is not None:
            await vm.host_api.close()
            vm.host_api = None
        self.backend.detach(vm)
        self.vms.pop(vm.id, None)

    async def reload(self) -> tuple[int, int, int]:
        """scan run_path: load new VMs, drop vanished ones, finish interrupted removals, start
        those marked started. Returns (loaded, updated, removed)."""
        loaded = updated = removed = 0
        async with self._lock:
            dirs = {wd.id: wd for wd in VmWorkDir.scan(self.config.run_path)}
            for vm_id in list(self.vms):
                if vm_id not in dirs:
                    await self._forget(self.vms[vm_id])
                    removed += 1
            for vm_id, wd in dirs.items():
                try:
                    if vm_id in self.vms:
                        self.vms[vm_id].manifest = wd.manifest()
                        updated += 1
                    else:
                        vm = await self._load(wd)
                        loaded += 1
                        if vm.removing:
                            self._spawn_removal(vm)
                except (VmmError, WorkDirError, OSError) as e:
                    log.error("skipping vm directory %s: %s", wd.path, e)
        for vm in list(self.vms.values()):
            if not vm.removing and vm.workdir.started() and not self.is_running(vm):
                try:
                    await self.start_vm(vm.id)
                except (VmmError, OSError) as e:
                    log.error("cannot start vm %s: %s", vm.id, e)
        return loaded, updated, removed

    # ------------------------------------------------------------------ create
    async def create_vm(self, req: pb.VmConfiguration) -> str:
        """CreateVm: every field checked (and each the backend cannot honour refused) before
        anything is written; started unless `stopped`. Returns the new VM's id."""
        async with self._lock:
            manifest = self.admission.create(req, self.images())
            raw = req.compose_file.encode()
            files = hostshare.creation_files(
                raw, manifest.app_id, req.encrypted_env, req.user_config
            )
            wd = VmWorkDir.create(self.config.run_path, manifest, files)
            try:
                wd.set_started(not req.stopped)
                vm = await self._load(wd)
            except BaseException:
                shutil.rmtree(wd.path, ignore_errors=True)
                raise
        log.info("created vm %s (%s, app %s)", manifest.id, manifest.name, manifest.app_id)
        if not req.stopped:
            try:
                await self.start_vm(vm.id)
            except (VmmError, OSError) as e:
                await self.remove_vm(vm.id, wait=True)
                raise VmmError(f"cannot start the vm: {e}") from e
        return manifest.id

    # ------------------------------------------------------------------ start and stop
    async def start_vm(self, vm_id: str) -> None:
        """mark the VM started and boot it unless it runs (then only the desired state and the
        sys-config of its next boot change)."""
        vm = self.get(vm_id)
        if vm.removing:
            raise InvalidState("the vm is being removed")
        image = self.images().get(vm.manifest.image)
        if image is None:
            raise Refused(f"image {vm.manifest.image!r} of this vm no longer exists")
        running = self.is_running(vm)
        if not running:
            self.backend.check_start(vm)
        wd, m = vm.workdir, vm.manifest
        channel = self.backend.host_api_channel(vm)
        hostshare.write_boot_config(wd, self.config, m, image, channel.guest_url)
        wd.set_started(True)
        vm.runtime.boot_progress = "booting"
        vm.runtime.boot_error = ""
        vm.runtime.shutdown_progress = ""
        save_runtime(vm)
        if running:
            return
        compose = wd.read_shared(hs.APP_COMPOSE) or b""
        vm.td = None
        if m.simulated_tee:
            vm.td = VmTd.fresh(
                self.seed,
                TdIdentity(image.digest, hashlib.sha256(compose).digest()),
                wd.path / TD_STATE_FILE,
            )
        logrotate.start_boot_logs(wd.path, self.config.log_max_backups, self.clock())
        spec = BootSpec(
            image=image,
            hostname=hostname_of(m.name),
            vcpu=m.vcpu,
            memory_mb=m.memory,
            ports=tuple(m.port_map),
            networks=tuple(m.networks),
            hugepages=m.hugepages,
            pin_numa=m.pin_numa,
            gpus=m.gpus,
            no_tee=m.no_tee,
            serial_log=wd.path / logrotate.SERIAL_LOG,
            stdout_log=wd.path / logrotate.STDOUT_LOG,
        )
        await self.backend.launch(vm, spec)
        vm.started_at = self.clock()
        vm.alive = True

    async def _halt(self, vm: Vm, grace: float) -> None:
        """stop the CVM (if it runs) and clean up after it; the exit time is recorded."""
        await self.backend.stop(vm, grace)
        self.is_running(vm)  # records the exit time
        await self.backend.cleanup(vm)

    async def stop_vm(self, vm_id: str) -> None:
        """StopVm: a hard stop (short grace, then killed); it will not be restarted."""
        vm = self.get(vm_id)
        vm.workdir.set_started(False)
        await self._halt(vm, STOP_GRACE)
        log.info("stopped vm %s", vm.id)

    async def shutdown_vm(self, vm_id: str) -> None:
        """ShutdownVm: ask the guest to power off; without a guest API (still booting), the
        backend's power button. Does not wait."""
        vm = self.get(vm_id)
        if not self.is_running(vm):
            raise InvalidState("the vm is not running")
        vm.workdir.set_started(False)  # a requested power-off is not a crash to restart
        try:
            await self.guest_call(vm_id, "Shutdown", Empty(), Empty, timeout=5)
        except (GuestUnavailable, RpcError):
            await self.backend.power_off(vm)

    async def remove_vm(self, vm_id: str, *, wait: bool = False) -> None:
        """RemoveVm: marked removing at once (idempotent); the CVM is stopped and its
        directory deleted in the background (or before returning with `wait`)."""
        vm = self.get(vm_id)
        if vm.removing:
            return
        vm.removing = True
        vm.workdir.mark_removing()
        vm.workdir.set_started(False)
        if wait:
            await self._finish_removal(vm)
        else:
            self._spawn_removal(vm)

    def _spawn_removal(self, vm: Vm) -> None:
        self.tasks.spawn(self._finish_removal(vm), name=f"remove {vm.id}")

    async def _finish_removal(self, vm: Vm) -> None:
        await self._forget(vm)
        await asyncio.to_thread(rmtree_vm_dir, vm.workdir.path)
        log.info("removed vm %s", vm.id)

    # ------------------------------------------------------------------ update
    async def update_vm(self, req: pb.UpdateVmRequest) -> str:
        """UpdateVm/UpgradeApp (see :mod:`.updates`); returns sha256(new compose)[:40] or ""."""
        return updates.update_vm(self, req)

    async def resize_vm(self, req: pb.ResizeVmRequest) -> None:
        updates.resize_vm(self, req)

    # ------------------------------------------------------------------ guest api
    async def guest_call(
        self, vm_id: str, method: str, req: Message, resp_type: type[M], timeout: float = 30
    ) -> M:
        """call the CVM's guest agent; GuestUnavailable when it cannot be reached, the guest's
        own error (RpcError) when it refuses."""
        vm = self.get(vm_id)
        address = self.backend.guest_api_address(vm) if self.is_running(vm) else None
        if address is None:
            raise GuestUnavailable(
                "the vm's guest api is not available (is it running and booted?)"
            )
        async with PrpcClient(address, prefix="/api", timeout=timeout) as client:
            try:
                return await client.call(method, req, resp_type)
            except (TimeoutError, OSError) as e:
                raise GuestUnavailable(f"guest api unreachable: {e}") from e


def hostname_of(name: str) -> str:
    """the vm name as a hostname label (what a QEMU guest would be called)."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return label or "dstack-cvm"


def rmtree_vm_dir(path: Path) -> None:
    """remove a VM directory (nothing of a dead CVM stays mounted: its namespace is gone)."""
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        subprocess.run(["umount", "-R", "-l", str(path)], capture_output=True, check=False)
        shutil.rmtree(path, ignore_errors=True)
