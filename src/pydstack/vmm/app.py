"""the VMM's state and CVM lifecycle (create, start, stop, shutdown, update, remove, reload).

There is no database: each VM is its directory under `run_path` (manifest, desired state, host
share). A running CVM is a sandbox launcher process in its own session, found again after a VMM
restart through `launcher.pid` and its command line. VMs whose desired state is started but whose
process is gone are restarted with exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.empty_pb2 import Empty

from pydstack import __version__
from pydstack.errors import ConfigError
from pydstack.rpc.client import PrpcClient
from pydstack.rpc.proto import host_api_pb2 as hpb
from pydstack.rpc.proto import vmm_rpc_pb2 as pb
from pydstack.rpc.server import CallContext, PrpcServer, PrpcService, RpcError
from pydstack.types import hostshare as hs

from . import sandbox
from .compose import PortMapping
from .config import VmmConfig
from .images import Image, ensure_sandbox_image, load_images
from .runtime import VmRuntime
from .td import STATE_FILE as TD_STATE_FILE
from .td import TDX_HOST, TdIdentity, TdxHostImpl, VmTd
from .validate import humantime, validate_app_compose
from .workdir import VmManifest, VmWorkDir, WorkDirError, atomic_write, new_vm_id

log = logging.getLogger("dstack-vmm")

NAME_RE = re.compile(r"^[A-Za-z0-9\-_. @~!$^()]{1,64}$")
HOST_API_URL = "unix:/run/dstack/host-api/api.sock"
MAX_ENV = 256 * 1024
MAX_USER_CONFIG = 1024 * 1024
HOST_API = hpb.DESCRIPTOR.services_by_name["HostApi"]
#: each cvm's containers run in a user namespace of this many ids, at ip_index * USERNS_SIZE on
#: the host: container root is an unprivileged host uid of its own (indices stay below 65535,
#: so the last range ends under 2**32 - 1)
USERNS_SIZE = 65536


@dataclass
class Vm:
    workdir: VmWorkDir
    manifest: VmManifest
    runtime: VmRuntime
    ip_index: int
    proc: subprocess.Popen[bytes] | None = None
    pid: int = 0
    started_at: float = 0.0
    exited_at: float = 0.0
    removing: bool = False
    restart_attempts: int = 0
    next_restart: float = 0.0
    host_api: PrpcServer | None = None
    #: the simulated TD of this boot, held here as the TDX module would hold it
    td: VmTd | None = None

    @property
    def id(self) -> str:
        return self.manifest.id

    @property
    def spec_path(self) -> Path:
        return self.workdir.path / "launch.json"

    def is_running(self) -> bool:
        if self.proc is not None:
            if self.proc.poll() is None:
                return True
            self.proc = None
            self.exited_at = self.exited_at or time.time()
            return False
        if self.pid and sandbox.is_launcher(self.pid, self.spec_path):
            return True
        if self.pid:
            self.pid = 0
            self.exited_at = self.exited_at or time.time()
        return False


class HostApiImpl:
    """the host API one CVM sees (its socket identifies it, as the vsock CID does upstream)."""

    def __init__(self, app: VmmApp, vm: Vm) -> None:
        self.app = app
        self.vm = vm

    async def Info(self, _: Empty, ctx: CallContext) -> hpb.HostInfo:
        return hpb.HostInfo(name="dstack VMM", version=__version__)

    async def Notify(self, req: hpb.Notification, ctx: CallContext) -> Empty:
        self.vm.runtime.notify(req.event, req.payload)
        self.app.save_runtime(self.vm)
        return Empty()

    async def GetSealingKey(
        self, req: hpb.GetSealingKeyRequest, ctx: CallContext
    ) -> hpb.GetSealingKeyResponse:
        raise RpcError("no local key provider on this host (use the kms key provider)")


class VmmApp:
    def __init__(self, config: VmmConfig) -> None:
        self.config = config
        self.vms: dict[str, Vm] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._restart_task: asyncio.Task[None] | None = None
        self.seed = b""

    # ------------------------------------------------------------------ startup
    async def start(self) -> None:
        c = self.config
        c.run_path.mkdir(parents=True, exist_ok=True)
        ensure_sandbox_image(c.image_path)
        self.seed = c.mock_attestation_seed or self._stored_seed()
        await asyncio.to_thread(sandbox.ensure_bridge, c.sandbox_bridge, c.sandbox_subnet)
        await asyncio.to_thread(
            sandbox.apply_bridge_policy,
            c.sandbox_bridge,
            c.sandbox_subnet,
            self.cvm_host_ports(),
            outbound=c.sandbox_outbound,
        )
        await self.reload()
        if c.auto_restart_enabled:
            self._restart_task = asyncio.create_task(self._restart_loop())

    def cvm_host_ports(self) -> set[int]:
        """the host ports cvms need: their kms, gateway, pccs and registry, and any the
        operator lists in `[cvm.sandbox] host_ports`."""
        c = self.config
        urls = [*c.kms_urls, *c.gateway_urls, c.pccs_url, c.docker_registry]
        return sandbox.ports_of_urls(urls) | set(c.sandbox_host_ports)

    def _stored_seed(self) -> bytes:
        """the seed of the simulated TDX's mock PKI: from `mock_attestation_seed_file`, else a
        random one kept next to the run path (0600); never inside a CVM's reach."""
        path = self.config.mock_attestation_seed_file
        if path is not None:
            return read_seed_file(path)
        path = self.config.run_path.parent / "mock-attestation-seed"
        if path.exists():
            return read_seed_file(path)
        seed = os.urandom(32)
        atomic_write(path, seed.hex().encode(), 0o600)
        log.warning(
            "no [cvm.tee_simulator] mock_attestation_seed_file configured; generated one in %s",
            path,
        )
        return seed

    async def close(self) -> None:
        if self._restart_task is not None:
            self._restart_task.cancel()
        for t in list(self._tasks):
            t.cancel()
        for vm in self.vms.values():
            if vm.host_api is not None:
                await vm.host_api.close()

    def images(self) -> dict[str, Image]:
        return load_images(self.config.image_path)

    # ------------------------------------------------------------------ loading
    def _free_ip_index(self) -> int:
        used = {vm.ip_index for vm in self.vms.values()}
        net = ipaddress.ip_network(self.config.sandbox_subnet)
        for i in range(2, min(net.num_addresses - 1, 65535)):  # 65535: see USERNS_SIZE
            if i not in used:
                return i
        raise RpcError("no free address left in the sandbox subnet")

    async def _load(self, wd: VmWorkDir) -> Vm:
        manifest = wd.manifest()
        net_file = wd.path / "sandbox-net.json"
        index = 0
        with contextlib.suppress(OSError, ValueError, KeyError):
            index = int(json.loads(net_file.read_text())["ip_index"])
        if not index or any(v.ip_index == index for v in self.vms.values()):
            index = self._free_ip_index()
            atomic_write(net_file, json.dumps({"ip_index": index}).encode())
        runtime = VmRuntime(wd)
        runtime.events = type(runtime.events)(maxlen=self.config.event_buffer_size)
        vm = Vm(wd, manifest, runtime, index)
        with contextlib.suppress(OSError, ValueError):
            vm.pid = int((wd.path / "launcher.pid").read_text())
        if vm.is_running():
            vm.started_at = (wd.path / "launcher.pid").stat().st_mtime
            try:
                vm.td = VmTd.resume(self.seed, wd.path / TD_STATE_FILE)
            except (OSError, ValueError, KeyError) as e:
                log.error("cannot resume the td of running vm %s: %s", manifest.id, e)
            with contextlib.suppress(OSError, ValueError, AttributeError):
                saved = json.loads((wd.path / ".vmm-runtime.json").read_text())
                runtime.boot_progress = str(saved.get("boot_progress", ""))
                runtime.boot_error = str(saved.get("boot_error", ""))
                runtime.shutdown_progress = str(saved.get("shutdown_progress", ""))
        self.vms[manifest.id] = vm
        await self._serve_host_api(vm)
        return vm

    async def _serve_host_api(self, vm: Vm) -> None:
        d = vm.workdir.path / "host-api"
        d.mkdir(exist_ok=True)
        server = PrpcServer(max_body=64 * 1024, limits=self.config.server_limits)
        server.mount(PrpcService(HOST_API, HostApiImpl(self, vm), prefix="/api"))
        server.mount(PrpcService(TDX_HOST, TdxHostImpl(lambda: vm.td), prefix="/tdx"))
        await server.listen_unix(d / "api.sock", mode=0o600)
        vm.host_api = server

    def save_runtime(self, vm: Vm) -> None:
        r = vm.runtime
        data = {
            "boot_progress": r.boot_progress,
            "boot_error": r.boot_error,
            "shutdown_progress": r.shutdown_progress,
        }
        with contextlib.suppress(OSError):
            atomic_write(vm.workdir.path / ".vmm-runtime.json", json.dumps(data).encode())

    async def reload(self) -> tuple[int, int, int]:
        """scan run_path: load new VMs, drop vanished ones, start those marked started."""
        loaded = updated = removed = 0
        async with self._lock:
            dirs = {wd.id: wd for wd in VmWorkDir.scan(self.config.run_path)}
            for vm_id in list(self.vms):
                if vm_id not in dirs:
                    vm = self.vms.pop(vm_id)
                    await self._kill(vm)
                    if vm.host_api is not None:
                        await vm.host_api.close()
                    removed += 1
            for vm_id, wd in dirs.items():
                try:
                    if vm_id in self.vms:
                        self.vms[vm_id].manifest = wd.manifest()
                        updated += 1
                    else:
                        await self._load(wd)
                        loaded += 1
                except (WorkDirError, OSError) as e:
                    log.error("skipping vm directory %s: %s", wd.path, e)
        for vm in list(self.vms.values()):
            if vm.workdir.started() and not vm.is_running():
                try:
                    await self.start_vm(vm.id)
                except (RpcError, sandbox.SandboxError, OSError) as e:
                    log.error("cannot start vm %s: %s", vm.id, e)
        return loaded, updated, removed

    # ------------------------------------------------------------------ lookup
    def get(self, vm_id: str) -> Vm:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise RpcError(f"vm not found: {vm_id}")
        return vm

    def status_of(self, vm: Vm) -> str:
        if vm.removing:
            return "removing"
        started, running = vm.workdir.started(), vm.is_running()
        if started:
            return "running" if running else "exited"
        return "stopping" if running else "stopped"

    # ------------------------------------------------------------------ validation
    def _port_mappings(self, ports: Iterable[pb.PortMapping]) -> list[PortMapping]:
        """requested mappings with their defaults (tcp, the configured host address)."""
        return [
            PortMapping(
                p.protocol or "tcp",
                p.host_address or self.config.port_mapping_address,
                p.host_port,
                p.vm_port,
            )
            for p in ports
        ]

    def _check_ports(self, ports: list[PortMapping], *, vm: Vm | None = None) -> None:
        """the one validation of port mappings, for CreateVm and UpdateVm alike: mapping
        enabled, tcp/udp, an ip address, a host port in a configured range, no duplicate, not
        used by another vm, free on the host (a port `vm` already holds counts as free)."""
        c = self.config
        if ports and not c.port_mapping_enabled:
            raise RpcError("port mapping is disabled on this host")
        held = {(q.protocol, q.address, q.host_port) for q in vm.manifest.port_map} if vm else set()
        seen: set[tuple[str, int]] = set()
        for p in ports:
            if p.protocol not in ("tcp", "udp"):
                raise RpcError(f"invalid protocol {p.protocol!r}: tcp or udp")
            if not (0 < p.host_port < 65536 and 0 < p.vm_port < 65536):
                raise RpcError(f"port out of range: {p.host_port}:{p.vm_port}")
            try:
                ipaddress.ip_address(p.address)
            except ValueError:
                raise RpcError(f"invalid host address {p.address!r}") from None
            if not any(
                r.protocol == p.protocol and r.start <= p.host_port <= r.end for r in c.port_ranges
            ):
                raise RpcError(
                    f"host port {p.protocol}/{p.host_port} is outside the allowed ranges "
                    "([cvm.port_mapping] range)"
                )
            key = (p.protocol, p.host_port)
            if key in seen:
                raise RpcError(f"port {p.protocol}/{p.host_port} is mapped twice")
            seen.add(key)
            for other in self.vms.values():
                if vm is not None and other.id == vm.id:
                    continue
                for q in other.manifest.port_map:
                    if (q.protocol, q.host_port) == key:
                        raise RpcError(
                            f"port {p.protocol}/{p.host_port} is already used by vm "
                            f"{other.manifest.name}"
                        )
            if (p.protocol, p.address, p.host_port) in held:
                continue
            if not _port_free(p):
                raise RpcError(f"port {p.protocol}/{p.address}:{p.host_port} is in use on the host")

    def _check_name(self, name: str, exclude: str | None = None) -> None:
        if not NAME_RE.match(name):
            raise RpcError(
                "invalid vm name: 1-64 characters of letters, digits, space and - _ . @ ~ ! $ ^ ( )"
            )
        for vm in self.vms.values():
            if vm.manifest.name == name and vm.id != exclude and not vm.removing:
                raise RpcError(f"a vm named {name!r} already exists")

    # ------------------------------------------------------------------ create
    async def create_vm(self, req: pb.VmConfiguration) -> str:
        async with self._lock:
            self._check_name(req.name)
            images = self.images()
            if req.image not in images:
                known = ", ".join(sorted(images)) or "none"
                raise RpcError(f"image {req.image!r} not found (available: {known})")
            validate_app_compose(req.compose_file)
            if len(req.encrypted_env) > MAX_ENV:
                raise RpcError("encrypted env too large")
            if len(req.user_config) > MAX_USER_CONFIG:
                raise RpcError("user config too large")
            if req.gpus.gpus or req.gpus.attach_mode == "all":
                raise RpcError("gpus are not available on the sandbox backend")
            if req.simulated_tee and req.simulated_tee != "dstack-tdx":
                raise RpcError(f"simulated tee {req.simulated_tee!r} is not supported")
            for n in req.networks:
                if n.mode not in ("", "bridge"):
                    raise RpcError(f"networking mode {n.mode!r} is not supported by the sandbox")
            if req.vcpu > self.config.max_allocable_vcpu:
                raise RpcError(f"too many vcpus (max {self.config.max_allocable_vcpu})")
            if len(self.vms) >= self.config.max_cvm_number:
                raise RpcError(f"too many vms (max {self.config.max_cvm_number})")
            ports = self._port_mappings(req.ports)
            self._check_ports(ports)
            raw = req.compose_file.encode()
            app_id = (
                req.app_id.removeprefix("0x").lower()
                if req.HasField("app_id") and req.app_id
                else hashlib.sha256(raw).hexdigest()[:40]
            )
            try:
                if len(bytes.fromhex(app_id)) != 20:
                    raise ValueError
            except ValueError:
                raise RpcError("app_id must be 20 bytes of hex") from None
            manifest = VmManifest(
                id=new_vm_id(),
                name=req.name,
                app_id=app_id,
                vcpu=req.vcpu or 1,
                memory=req.memory or 1024,
                disk_size=req.disk_size or 20,
                image=req.image,
                port_map=ports,
                kms_urls=list(req.kms_urls),
                gateway_urls=list(req.gateway_urls),
                no_tee=True,
                simulated_tee="dstack-tdx",
            )
            files = {
                hs.APP_COMPOSE: raw,
                hs.INSTANCE_INFO: json.dumps({"app_id": app_id}).encode(),
            }
            if req.encrypted_env:
                files[hs.ENCRYPTED_ENV] = req.encrypted_env
            if req.user_config:
                files[hs.USER_CONFIG] = req.user_config.encode()
            wd = VmWorkDir.create(self.config.run_path, manifest, files)
            try:
                wd.set_started(not req.stopped)
                vm = await self._load(wd)
            except BaseException:
                shutil.rmtree(wd.path, ignore_errors=True)
                self.vms.pop(manifest.id, None)
                raise
        log.info("created vm %s (%s, app %s)", manifest.id, manifest.name, app_id)
        if not req.stopped:
            try:
                await self.start_vm(vm.id)
            except (RpcError, sandbox.SandboxError, OSError) as e:
                await self.remove_vm(vm.id, wait=True)
                raise RpcError(f"cannot start the vm: {e}") from e
        return manifest.id

    # ------------------------------------------------------------------ start/stop
    def _sys_config(self, vm: Vm, image: Image) -> dict[str, Any]:
        c = self.config
        m = vm.manifest
        vm_config = {
            "spec_version": 1,
            "os_image_hash": image.digest,
            "cpu_count": m.vcpu,
            "memory_size": m.memory * 1024 * 1024,
            "image": m.image,
        }
        return {
            "kms_urls": m.kms_urls or list(c.kms_urls),
            "gateway_urls": m.gateway_urls or list(c.gateway_urls),
            "pccs_url": c.pccs_url,
            "collateral_urls": {"pccs": c.pccs_url},
            "docker_registry": c.docker_registry,
            "host_api_url": HOST_API_URL,
            "vm_config": json.dumps(vm_config, separators=(",", ":")),
        }

    def _check_host_memory(self) -> None:
        """sandbox cvms share the host's memory (about 70 MiB each idle); starting one into
        an exhausted host thrashes it until the kernel's OOM killer picks a victim."""
        need = self.config.sandbox_min_free_memory_mb
        avail = _mem_available_mb()
        if need and avail is not None and avail < need:
            raise RpcError(
                f"not enough free host memory to start a cvm: {avail} MiB available, "
                f"{need} MiB required ([cvm.sandbox] min_free_memory_mb)"
            )

    async def start_vm(self, vm_id: str) -> None:
        vm = self.get(vm_id)
        if vm.removing:
            raise RpcError("the vm is being removed")
        image = self.images().get(vm.manifest.image)
        if image is None:
            raise RpcError(f"image {vm.manifest.image!r} of this vm no longer exists")
        if not vm.is_running():
            self._check_host_memory()
        wd = vm.workdir
        wd.write_shared(hs.SYS_CONFIG, json.dumps(self._sys_config(vm, image)).encode())
        stale = wd.shared / ".tee-simulator.json"  # earlier versions put the seed here
        if stale.exists():
            stale.unlink()
        wd.set_started(True)
        vm.runtime.boot_progress = "booting"
        vm.runtime.boot_error = ""
        vm.runtime.shutdown_progress = ""
        self.save_runtime(vm)
        if vm.is_running():
            return
        compose = wd.read_shared(hs.APP_COMPOSE) or b""
        vm.td = VmTd.fresh(
            self.seed,
            TdIdentity(image.digest, hashlib.sha256(compose).digest()),
            wd.path / TD_STATE_FILE,
        )
        netns, veth = sandbox.names_for(vm.id)
        net = ipaddress.ip_network(self.config.sandbox_subnet)
        spec = sandbox.LaunchSpec(
            vm_id=vm.id,
            workdir=str(wd.path),
            netns=netns,
            veth=veth,
            address=f"{self.guest_address(vm)}/{net.prefixlen}",
            gateway=self.config.host_ip,
            bridge=self.config.sandbox_bridge,
            ports=[
                sandbox.PortForward(p.protocol, p.address, p.host_port, p.vm_port)
                for p in vm.manifest.port_map
            ],
            scrypt_n=self.config.sandbox_scrypt_n,
            hostname=_hostname(vm.manifest.name),
            uid_base=USERNS_SIZE * vm.ip_index,
            vcpu=vm.manifest.vcpu,
            memory_mb=vm.manifest.memory,
        )
        atomic_write(vm.spec_path, spec.to_json().encode())
        for name in ("serial.log", "stdout.log"):
            self._rotate(wd.path / name)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with open(wd.path / "serial.log", "ab") as f:
            f.write(f"===== boot @ {stamp} =====\n".encode())
        out = open(wd.path / "stdout.log", "ab")  # noqa: SIM115
        try:
            vm.proc = subprocess.Popen(
                [sys.executable, "-m", "pydstack.vmm.sandbox", "--spec", str(vm.spec_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=wd.path,
            )
        finally:
            out.close()
        vm.pid = vm.proc.pid
        atomic_write(wd.path / "launcher.pid", str(vm.pid).encode())
        vm.started_at = time.time()
        vm.exited_at = 0.0
        log.info("started vm %s (launcher pid %d)", vm.id, vm.pid)

    def _rotate(self, path: Path) -> None:
        """keep `max_backups` previous logs: every start archives the last boot."""
        if not path.exists() or path.stat().st_size == 0:
            return
        n = self.config.log_max_backups
        for i in range(n - 1, 0, -1):
            older = path.with_name(f"{path.name}.{i}")
            if older.exists():
                os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
        if n > 0:
            os.replace(path, path.with_name(f"{path.name}.1"))

    async def _kill(self, vm: Vm, grace: float = 0.0) -> None:
        """stop the CVM's processes (SIGTERM with a grace period, then SIGKILL)."""
        pid = vm.proc.pid if vm.proc is not None else vm.pid
        if pid and vm.is_running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM if grace else signal.SIGKILL)
            deadline = time.monotonic() + grace
            while vm.is_running() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if vm.is_running():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            for _ in range(100):
                if not vm.is_running():
                    break
                await asyncio.sleep(0.05)
        netns, veth = sandbox.names_for(vm.id)
        await asyncio.to_thread(sandbox.teardown_network, netns, veth)
        await sandbox.remove_cgroup(vm.workdir.path)
        vm.exited_at = vm.exited_at or time.time()

    async def stop_vm(self, vm_id: str) -> None:
        vm = self.get(vm_id)
        vm.workdir.set_started(False)
        await self._kill(vm, grace=3.0)
        log.info("stopped vm %s", vm.id)

    async def shutdown_vm(self, vm_id: str) -> None:
        vm = self.get(vm_id)
        if not vm.is_running():
            raise RpcError("the vm is not running")
        vm.workdir.set_started(False)  # a requested power-off is not a crash to restart
        try:
            await self.guest_call(vm_id, "Shutdown", Empty(), Empty, timeout=5)
        except RpcError:
            # no guest api (still booting): ask the launcher for a graceful stop instead
            with contextlib.suppress(ProcessLookupError):
                os.kill(vm.pid, signal.SIGTERM)

    async def remove_vm(self, vm_id: str, *, wait: bool = False) -> None:
        vm = self.get(vm_id)
        if vm.removing:
            return
        vm.removing = True
        (vm.workdir.path / ".removing").touch()
        vm.workdir.set_started(False)

        async def finish() -> None:
            await self._kill(vm)
            if vm.host_api is not None:
                await vm.host_api.close()
            await asyncio.to_thread(_rmtree_mounts, vm.workdir.path)
            self.vms.pop(vm.id, None)
            log.info("removed vm %s", vm.id)

        if wait:
            await finish()
        else:
            self._spawn(finish())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ update
    async def update_vm(self, req: pb.UpdateVmRequest) -> str:
        """UpgradeApp/UpdateVm: everything is checked before anything is written, so a refused
        update leaves the vm as it was."""
        vm = self.get(req.id)
        wd = vm.workdir
        result = ""
        if req.compose_file:
            validate_app_compose(req.compose_file)
            result = hashlib.sha256(req.compose_file.encode()).hexdigest()[:40]
        if len(req.encrypted_env) > MAX_ENV:
            raise RpcError("encrypted env too large")
        ports: list[PortMapping] | None = None
        if req.update_ports:
            ports = self._port_mappings(req.ports)
            self._check_ports(ports, vm=vm)
        resize = pb.ResizeVmRequest(id=req.id)
        for f in ("vcpu", "memory", "disk_size", "image"):
            if req.HasField(f):
                setattr(resize, f, getattr(req, f))
        if any(resize.HasField(f) for f in ("vcpu", "memory", "disk_size", "image")):
            await self.resize_vm(resize)  # checks its own preconditions before changing
        if req.compose_file:
            wd.write_shared(hs.APP_COMPOSE, req.compose_file.encode())
        if req.encrypted_env:
            wd.write_shared(hs.ENCRYPTED_ENV, req.encrypted_env)
        if req.user_config:
            wd.write_shared(hs.USER_CONFIG, req.user_config.encode())
        m = vm.manifest
        if ports is not None:
            m.port_map = ports
        if req.update_kms_urls:
            m.kms_urls = list(req.kms_urls)
        if req.update_gateway_urls:
            m.gateway_urls = list(req.gateway_urls)
        wd.save_manifest(m)
        vm.manifest = m
        return result

    async def resize_vm(self, req: pb.ResizeVmRequest) -> None:
        vm = self.get(req.id)
        fields = [f for f in ("vcpu", "memory", "disk_size", "image") if req.HasField(f)]
        if not fields:
            raise RpcError("nothing to resize: give vcpu, memory, disk_size or image")
        if self.status_of(vm) not in ("stopped", "exited"):
            raise RpcError("the vm must be stopped to be resized")
        m = copy.deepcopy(vm.manifest)  # the vm keeps its manifest if a field is refused
        if req.HasField("vcpu"):
            if not 0 < req.vcpu <= self.config.max_allocable_vcpu:
                raise RpcError("invalid vcpu count")
            m.vcpu = req.vcpu
        if req.HasField("memory"):
            if req.memory == 0:
                raise RpcError("memory must be positive")
            m.memory = req.memory
        if req.HasField("disk_size"):
            if req.disk_size < m.disk_size:
                raise RpcError("the disk can only grow")
            m.disk_size = req.disk_size
        if req.HasField("image"):
            if req.image not in self.images():
                raise RpcError(f"image {req.image!r} not found")
            m.image = req.image
        vm.workdir.save_manifest(m)
        vm.manifest = m

    # ------------------------------------------------------------------ info
    def vm_info(self, vm: Vm, brief: bool = False) -> pb.VmInfo:
        m = vm.manifest
        status = self.status_of(vm)
        info = pb.VmInfo(
            id=m.id,
            name=m.name,
            status=status,
            uptime=humantime(time.time() - vm.started_at)
            if status in ("running", "stopping") and vm.started_at
            else "never",
            app_id=m.app_id,
            boot_progress=vm.runtime.boot_progress,
            boot_error=vm.runtime.boot_error,
            shutdown_progress=vm.runtime.shutdown_progress,
            image_version=str(self.images().get(m.image, Image("", Path(), {}, "")).version),
            exited_at=humantime(time.time() - vm.exited_at) if vm.exited_at else "never",
        )
        raw_info = vm.workdir.read_shared(hs.INSTANCE_INFO)
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            iid = json.loads(raw_info or b"{}").get("instance_id", "")
            if iid:
                info.instance_id = iid
        for e in vm.runtime.events:
            info.events.append(
                pb.GuestEvent(event=e.event, body=e.payload, timestamp=e.timestamp_ms)
            )
        _, veth = sandbox.names_for(vm.id)
        info.interfaces.append(
            pb.NetworkInterfaceStatus(
                mode="bridge",
                backend="veth",
                mac=sandbox.mac_for(vm.id),
                bridge_name=self.config.sandbox_bridge,
                netdev_id=veth,
            )
        )
        if not brief:
            cfg = info.configuration
            cfg.name, cfg.image = m.name, m.image
            cfg.compose_file = (vm.workdir.read_shared(hs.APP_COMPOSE) or b"").decode()
            cfg.encrypted_env = vm.workdir.read_shared(hs.ENCRYPTED_ENV) or b""
            cfg.user_config = (vm.workdir.read_shared(hs.USER_CONFIG) or b"").decode()
            cfg.vcpu, cfg.memory, cfg.disk_size = m.vcpu, m.memory, m.disk_size
            cfg.app_id = m.app_id
            cfg.kms_urls.extend(m.kms_urls)
            cfg.gateway_urls.extend(m.gateway_urls)
            cfg.stopped = not vm.workdir.started()
            cfg.no_tee = m.no_tee
            if m.simulated_tee:
                cfg.simulated_tee = m.simulated_tee
            for p in m.port_map:
                cfg.ports.append(
                    pb.PortMapping(
                        protocol=p.protocol,
                        host_port=p.host_port,
                        vm_port=p.vm_port,
                        host_address=p.address,
                    )
                )
        return info

    def guest_address(self, vm: Vm) -> str:
        net = ipaddress.ip_network(self.config.sandbox_subnet)
        return str(net.network_address + vm.ip_index)

    async def guest_call(
        self, vm_id: str, method: str, req: Any, resp_type: Any, timeout: float = 30
    ) -> Any:
        vm = self.get(vm_id)
        sock = vm.workdir.path / "guest-api" / "api.sock"
        if not vm.is_running() or not sock.exists():
            raise RpcError("the vm's guest api is not available (is it running and booted?)")
        async with PrpcClient(str(sock), prefix="/api", timeout=timeout) as client:
            try:
                return await client.call(method, req, resp_type)
            except (TimeoutError, OSError) as e:
                raise RpcError(f"guest api unreachable: {e}") from e

    # ------------------------------------------------------------------ auto restart
    async def _restart_loop(self) -> None:
        c = self.config
        while True:
            await asyncio.sleep(min(c.auto_restart_interval, 1.0))
            now = time.time()
            for vm in list(self.vms.values()):
                if vm.removing or not vm.workdir.started():
                    vm.restart_attempts = 0
                    continue
                if vm.is_running():
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
                if vm.restart_attempts > c.auto_restart_max_retries:
                    continue
                try:
                    error = vm.runtime.boot_error
                    await self.start_vm(vm.id)
                    vm.runtime.notify(
                        "vmm.auto_restart", f"attempt {vm.restart_attempts}: {error}"[:1024]
                    )
                    if vm.restart_attempts == c.auto_restart_max_retries:
                        vm.runtime.notify("vmm.auto_restart.exhausted", error[:1024])
                except (RpcError, sandbox.SandboxError, OSError) as e:
                    log.error("auto-restart of vm %s failed: %s", vm.id, e)


def read_seed_file(path: Path) -> bytes:
    """a 32-byte seed stored as hex; refuses a file others may read."""
    try:
        st = path.stat()
        text = path.read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the mock attestation seed {path}: {e.strerror}") from e
    if st.st_mode & 0o077:
        raise ConfigError(
            f"the mock attestation seed {path} is readable by others "
            f"(mode {st.st_mode & 0o777:o}); chmod 600 it"
        )
    try:
        seed = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise ConfigError(f"the mock attestation seed {path} must hold 32 bytes of hex")
    return seed


def _mem_available_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return None


def _hostname(name: str) -> str:
    """the vm name as a hostname label (what a QEMU guest would be called)."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return label or "dstack-cvm"


def _port_free(p: PortMapping) -> bool:
    kind = socket.SOCK_DGRAM if p.protocol == "udp" else socket.SOCK_STREAM
    family = socket.AF_INET6 if ":" in p.address else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((p.address, p.host_port))
        except OSError:
            return False
    return True


def _rmtree_mounts(path: Path) -> None:
    """remove a VM directory (nothing of a dead CVM stays mounted: its namespace is gone)."""
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        subprocess.run(["umount", "-R", "-l", str(path)], capture_output=True, check=False)
        shutil.rmtree(path, ignore_errors=True)
