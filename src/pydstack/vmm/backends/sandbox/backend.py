"""the sandbox backend: each CVM a launcher process that runs the pydstack guest in its own
Linux namespaces, attached to one host bridge (see :mod:`.launcher`).

Per VM it keeps an address index in the bridge's subnet (`sandbox-net.json`, kept across
stop/start; it also places the CVM's container user namespace, see USERNS_SIZE) and the launcher's
pid (`launcher.pid`, found again after a VMM restart through its command line). It offers bridge
networking only, no GPUs, hugepages or NUMA pinning, and the simulated TDX as its only TEE.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydstack.vmm.config import VmmConfig
from pydstack.vmm.errors import Refused
from pydstack.vmm.vm import Vm
from pydstack.vmm.workdir import atomic_write

from ..base import BootSpec, Capabilities, GpuDevice, HostApiChannel, InterfaceStatus, ProcessInfo
from . import cgroups, network
from .config import SandboxConfig
from .forward import PortForward
from .image import IMAGE_KIND, SANDBOX_IMAGE, ensure_sandbox_image
from .launcher import MODULE, LaunchSpec, is_launcher

log = logging.getLogger("dstack-vmm")

#: the host API socket as the guest sees it (its VM directory's host-api/ is mounted there)
GUEST_HOST_API_URL = "unix:/run/dstack/host-api/api.sock"
#: each cvm's containers run in a user namespace of this many ids, at ip_index * USERNS_SIZE on
#: the host: container root is an unprivileged host uid of its own (indices stay below 65535,
#: so the last range ends under 2**32 - 1)
USERNS_SIZE = 65536
NET_FILE = "sandbox-net.json"
PID_FILE = "launcher.pid"
SPEC_FILE = "launch.json"
REQUIRED_TOOLS = ("ip", "iptables", "nsenter", "unshare", "podman", "gocryptfs", "fusermount3")


@dataclass
class _Cvm:
    ip_index: int
    proc: subprocess.Popen[bytes] | None = None
    pid: int = 0


class SandboxBackend:
    name = "sandbox"

    def __init__(self, config: VmmConfig, settings: SandboxConfig) -> None:
        self.config = config
        self.settings = settings
        self.capabilities = Capabilities(
            networking_modes=("bridge",),
            default_bridge=settings.bridge,
            bridges=(settings.bridge,),
            max_networks=1,
            tee_kinds=("simulated-tdx",),
            no_tee=True,
            image_kinds=(IMAGE_KIND,),
            builtin_images=frozenset({SANDBOX_IMAGE}),
        )
        self._cvms: dict[str, _Cvm] = {}

    # ------------------------------------------------------------------ host
    def host_problems(self) -> list[str]:
        problems = []
        if os.geteuid() != 0:
            problems.append("the sandbox backend needs root (network namespaces, mounts)")
        problems += [f"{t} is not installed" for t in REQUIRED_TOOLS if shutil.which(t) is None]
        if not Path("/dev/fuse").exists():
            problems.append("/dev/fuse is missing (gocryptfs needs FUSE)")
        return problems

    def cvm_host_ports(self) -> set[int]:
        """the host ports cvms need: their kms, gateway, pccs and registry, and any the
        operator lists in `[cvm.sandbox] host_ports`."""
        c = self.config
        urls = [*c.kms_urls, *c.gateway_urls, c.pccs_url, c.docker_registry]
        return network.ports_of_urls(urls) | set(self.settings.host_ports)

    def cvm_udp_ports(self) -> set[int]:
        """the udp ports cvms need besides those: a gateway's WireGuard, when they have one."""
        if not any(self.config.gateway_urls):
            return set()
        return set(self.settings.wireguard_ports)

    async def prepare(self) -> None:
        s = self.settings
        ensure_sandbox_image(self.config.image_path)
        await asyncio.to_thread(network.ensure_bridge, s.bridge, s.subnet)
        await asyncio.to_thread(
            network.apply_bridge_policy,
            s.bridge,
            s.subnet,
            self.cvm_host_ports(),
            outbound=s.outbound,
            udp_ports=self.cvm_udp_ports(),
        )
        log.info("sandbox backend: bridge %s (%s)", s.bridge, s.subnet)

    async def close(self) -> None:
        """nothing to release: launchers run in their own sessions and outlive the VMM."""

    # ------------------------------------------------------------------ per vm
    def _free_ip_index(self) -> int:
        used = {c.ip_index for c in self._cvms.values()}
        net = ipaddress.ip_network(self.settings.subnet)
        for i in range(2, min(net.num_addresses - 1, 65535)):  # 65535: see USERNS_SIZE
            if i not in used:
                return i
        raise Refused("no free address left in the sandbox subnet")

    def attach(self, vm: Vm) -> None:
        path = vm.workdir.path
        index = 0
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            index = int(json.loads((path / NET_FILE).read_text())["ip_index"])
        if not index or any(c.ip_index == index for c in self._cvms.values()):
            index = self._free_ip_index()
            atomic_write(path / NET_FILE, json.dumps({"ip_index": index}).encode())
        cvm = _Cvm(index)
        with contextlib.suppress(OSError, ValueError):
            cvm.pid = int((path / PID_FILE).read_text())
        self._cvms[vm.id] = cvm

    def detach(self, vm: Vm) -> None:
        self._cvms.pop(vm.id, None)

    def _cvm(self, vm: Vm) -> _Cvm:
        cvm = self._cvms.get(vm.id)
        if cvm is None:
            raise Refused(f"vm {vm.id} is not attached to the sandbox backend")
        return cvm

    def host_api_channel(self, vm: Vm) -> HostApiChannel:
        return HostApiChannel(vm.workdir.path / "host-api" / "api.sock", GUEST_HOST_API_URL)

    def guest_address(self, vm: Vm) -> str:
        net = ipaddress.ip_network(self.settings.subnet)
        return str(net.network_address + self._cvm(vm).ip_index)

    def check_start(self, vm: Vm) -> None:
        """sandbox cvms share the host's memory (about 70 MiB each idle); starting one into
        an exhausted host thrashes it until the kernel's OOM killer picks a victim."""
        need = self.settings.min_free_memory_mb
        avail = mem_available_mb()
        if need and avail is not None and avail < need:
            raise Refused(
                f"not enough free host memory to start a cvm: {avail} MiB available, "
                f"{need} MiB required ([cvm.sandbox] min_free_memory_mb)"
            )

    async def launch(self, vm: Vm, spec: BootSpec) -> None:
        cvm = self._cvm(vm)
        s = self.settings
        path = vm.workdir.path
        netns, veth = network.names_for(vm.id)
        prefix = ipaddress.ip_network(s.subnet).prefixlen
        launch = LaunchSpec(
            vm_id=vm.id,
            workdir=str(path),
            netns=netns,
            veth=veth,
            address=f"{self.guest_address(vm)}/{prefix}",
            gateway=s.host_ip,
            bridge=s.bridge,
            ports=[PortForward(p.protocol, p.address, p.host_port, p.vm_port) for p in spec.ports],
            scrypt_n=s.scrypt_n,
            hostname=spec.hostname,
            uid_base=USERNS_SIZE * cvm.ip_index,
            vcpu=spec.vcpu,
            memory_mb=spec.memory_mb,
        )
        spec_path = path / SPEC_FILE
        atomic_write(spec_path, launch.to_json().encode())
        with open(spec.stdout_log, "ab") as out:
            cvm.proc = subprocess.Popen(
                [sys.executable, "-m", MODULE, "--spec", str(spec_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=path,
            )
        cvm.pid = cvm.proc.pid
        atomic_write(path / PID_FILE, str(cvm.pid).encode())
        log.info("started vm %s (launcher pid %d)", vm.id, cvm.pid)

    def is_alive(self, vm: Vm) -> bool:
        cvm = self._cvms.get(vm.id)
        if cvm is None:
            return False
        if cvm.proc is not None:
            if cvm.proc.poll() is None:
                return True
            cvm.proc, cvm.pid = None, 0
            return False
        if cvm.pid and is_launcher(cvm.pid, vm.workdir.path / SPEC_FILE):
            return True
        cvm.pid = 0
        return False

    def process(self, vm: Vm) -> ProcessInfo | None:
        if not self.is_alive(vm):
            return None
        cvm = self._cvm(vm)
        path = vm.workdir.path
        started = vm.started_at
        if not started:
            with contextlib.suppress(OSError):
                started = (path / PID_FILE).stat().st_mtime
        command = f"python -m {MODULE} --spec {path / SPEC_FILE}"
        return ProcessInfo(cvm.pid, command, started)

    async def stop(self, vm: Vm, grace: float) -> None:
        """SIGTERM to the launcher's process group (its guest gets a graceful stop) for up to
        `grace` seconds, then SIGKILL."""
        cvm = self._cvms.get(vm.id)
        if cvm is None or not self.is_alive(vm):
            return
        pid = cvm.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM if grace else signal.SIGKILL)
        deadline = time.monotonic() + grace
        while self.is_alive(vm) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.is_alive(vm):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        for _ in range(100):
            if not self.is_alive(vm):
                break
            await asyncio.sleep(0.05)

    async def power_off(self, vm: Vm) -> None:
        """SIGTERM to the launcher alone: it asks the guest to stop, then exits."""
        cvm = self._cvms.get(vm.id)
        if cvm is not None and self.is_alive(vm):
            with contextlib.suppress(ProcessLookupError):
                os.kill(cvm.pid, signal.SIGTERM)

    async def cleanup(self, vm: Vm) -> None:
        netns, veth = network.names_for(vm.id)
        await asyncio.to_thread(network.teardown_network, netns, veth)
        await cgroups.remove_cgroup(vm.workdir.path)

    def exit_detail(self, vm: Vm) -> str:
        """nothing: a sandbox guest reports its own errors."""
        return ""

    # ------------------------------------------------------------------ views
    def interfaces(self, vm: Vm) -> list[InterfaceStatus]:
        _, veth = network.names_for(vm.id)
        return [
            InterfaceStatus("bridge", "veth", network.mac_for(vm.id), self.settings.bridge, veth)
        ]

    def guest_api_address(self, vm: Vm) -> str | None:
        sock = vm.workdir.path / "guest-api" / "api.sock"
        return str(sock) if self.is_alive(vm) and sock.exists() else None

    def list_gpus(self) -> list[GpuDevice]:
        return []


def mem_available_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return None
