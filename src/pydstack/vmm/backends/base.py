"""what a CVM backend is: the one seam between the VMM and the way CVMs run on this host.

The VMM keeps VMs (directories, manifests, desired state), checks requests, writes the host
share, serves each CVM's host API and plays the simulated TD; a backend turns a VM into a running
CVM and back: it prepares the host, allocates per-VM resources (an address, a vsock CID), starts
the CVM process, tells whether it still runs, stops it (gracefully, then by force), cleans up
what it leaves, and says where the CVM's host API and guest API are reached. What it can do is in
its :class:`Capabilities`; the VMM refuses anything outside them before calling it.

Backends: `sandbox` (Linux namespaces, :mod:`.sandbox`); `qemu` (a QEMU process per CVM, TDX or
a development VM, a per-VM host-API channel, QMP for a graceful power-off, :mod:`.qemu`).

Errors: a host failure is a :class:`~pydstack.vmm.errors.BackendError`; a request the host
cannot take now (no free address, too little memory) is a :class:`~pydstack.vmm.errors.Refused`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..compose import PortMapping
from ..images import Image
from ..workdir import GpuSelection, NetworkSpec

if TYPE_CHECKING:
    from ..vm import Vm

#: the TEE kinds a backend may offer; `simulated-tdx` is the VMM's host-side simulated TD
TEE_KINDS = ("tdx", "simulated-tdx")


@dataclass(frozen=True)
class Capabilities:
    """what a backend can honour; a request for anything else is refused, never dropped."""

    #: networking modes a CVM may ask for; the first is the default
    networking_modes: tuple[str, ...]
    #: bridge a `bridge` network attaches to when it names none
    default_bridge: str = ""
    #: bridges a CVM may name (the default one included)
    bridges: tuple[str, ...] = ()
    #: network interfaces a CVM may have
    max_networks: int = 1
    gpus: bool = False
    allow_attach_all_gpus: bool = False
    hugepages: bool = False
    pin_numa: bool = False
    #: TEEs a CVM can run under (see TEE_KINDS); without `tdx` the simulated TD stands in for
    #: a requested TEE
    tee_kinds: tuple[str, ...] = ("simulated-tdx",)
    #: a CVM may be asked to run without a hardware TEE (`no_tee`)
    no_tee: bool = True
    #: the disk size can be changed after creation
    disk_resize: bool = True
    #: host ports can be forwarded into CVMs, with these protocols
    port_mapping: bool = True
    port_protocols: tuple[str, ...] = ("tcp", "udp")
    #: `kind` values of the guest images this backend boots
    image_kinds: tuple[str, ...] = ()
    #: image directories the backend provides itself (never deleted through the API)
    builtin_images: frozenset[str] = frozenset()
    #: without a hardware TEE, a CVM that asks for one gets the simulated TD instead (a
    #: development backend); False: such a request is refused, the simulated TD must be asked
    #: for (`simulated_tee`)
    simulate_tee_requests: bool = True
    #: seconds a boot may take before it is a boot error and the CVM is stopped (0: no limit)
    boot_timeout: float = 0.0

    @property
    def default_networking_mode(self) -> str:
        return self.networking_modes[0] if self.networking_modes else ""

    @property
    def hardware_tee(self) -> bool:
        return "tdx" in self.tee_kinds


@dataclass(frozen=True)
class BootSpec:
    """what one boot of a CVM needs beyond its identity and directory (from the VM's manifest,
    checked against the capabilities already)."""

    image: Image
    hostname: str
    vcpu: int
    memory_mb: int
    ports: tuple[PortMapping, ...] = ()
    networks: tuple[NetworkSpec, ...] = ()
    hugepages: bool = False
    pin_numa: bool = False
    gpus: GpuSelection = field(default_factory=GpuSelection)
    no_tee: bool = True
    #: the log files the VMM serves (`/logs`): the guest console, and the CVM process's output
    serial_log: Path = Path("serial.log")
    stdout_log: Path = Path("stdout.log")


@dataclass(frozen=True)
class HostApiChannel:
    """where the VMM serves one CVM's host API and how the guest reaches it. The socket is
    this CVM's alone, so a call on it identifies the CVM (as the vsock CID does upstream); a
    QEMU backend connects it to the guest with a guestfwd or virtio-serial chardev."""

    socket: Path
    #: `host_api_url` in the CVM's sys-config
    guest_url: str


@dataclass(frozen=True)
class InterfaceStatus:
    """one network interface of a CVM, as VmInfo reports it."""

    mode: str
    backend: str
    mac: str
    bridge_name: str | None = None
    netdev_id: str | None = None


@dataclass(frozen=True)
class ProcessInfo:
    """the host process that is the CVM (SvList)."""

    pid: int
    command: str
    #: wall-clock time it started
    started_at: float


@dataclass(frozen=True)
class GpuDevice:
    slot: str
    product_id: str
    description: str
    is_free: bool


class CvmBackend(Protocol):
    """how CVMs run on this host; one instance per VMM. Methods take the VM they act on and
    may be called for a VM in any state (a stopped VM's `cleanup` is a no-op)."""

    name: str
    capabilities: Capabilities

    def host_problems(self) -> list[str]:
        """what this host lacks for the backend (privileges, tools), worded for the operator."""
        ...

    async def prepare(self) -> None:
        """at VMM start, before any VM is loaded: host networking and its policy, built-in
        images. Idempotent; BackendError if the host cannot be set up."""
        ...

    async def close(self) -> None:
        """at VMM stop; running CVMs keep running."""
        ...

    def attach(self, vm: Vm) -> None:
        """`vm` joins the VMM (created, or found at start): allocate what it keeps across
        stop/start (an address, a CID) and find its process if it still runs from before.
        Refused if none is left."""
        ...

    def detach(self, vm: Vm) -> None:
        """`vm` leaves the VMM (removed, or its directory vanished): free what `attach` took."""
        ...

    def host_api_channel(self, vm: Vm) -> HostApiChannel: ...

    def check_start(self, vm: Vm) -> None:
        """Refused when the host cannot take this CVM now (e.g. too little free memory)."""
        ...

    async def launch(self, vm: Vm, spec: BootSpec) -> None:
        """start the CVM's process; returns once it is started (not booted). BackendError if
        it cannot be started, with nothing left running."""
        ...

    def is_alive(self, vm: Vm) -> bool: ...

    def process(self, vm: Vm) -> ProcessInfo | None:
        """the CVM's running process, None when it does not run."""
        ...

    async def stop(self, vm: Vm, grace: float) -> None:
        """stop the CVM: a graceful stop for up to `grace` seconds (0: none), then forced;
        returns once the process is gone."""
        ...

    async def power_off(self, vm: Vm) -> None:
        """ask the guest to power off (ACPI power button; QMP `system_powerdown`); does not
        wait. For when the guest API cannot be asked."""
        ...

    async def cleanup(self, vm: Vm) -> None:
        """remove what a stopped CVM leaves on the host (network, cgroup); idempotent."""
        ...

    def exit_detail(self, vm: Vm) -> str:
        """why the CVM's process ended, in its own last words (QEMU's error), or ""."""
        ...

    def interfaces(self, vm: Vm) -> list[InterfaceStatus]: ...

    def guest_api_address(self, vm: Vm) -> str | None:
        """where the guest agent's API of a running CVM is (a PrpcClient base: a Unix socket
        path or an http URL), None while it is not there."""
        ...

    def list_gpus(self) -> list[GpuDevice]:
        """the host's GPUs a CVM may attach (empty without the `gpus` capability)."""
        ...
