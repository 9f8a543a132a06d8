"""a CVM backend with no host underneath: the VMM's own logic (registry, lifecycle, admission,
supervisor, removal) tested without root or real CVMs."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydstack.vmm.backends import (
    BootSpec,
    Capabilities,
    GpuDevice,
    HostApiChannel,
    InterfaceStatus,
    ProcessInfo,
)
from pydstack.vmm.config import PortRange, VmmConfig
from pydstack.vmm.errors import Refused
from pydstack.vmm.vm import Vm

IMAGE = "fake-image"
SEED = bytes(range(32))

CAPS = Capabilities(
    networking_modes=("bridge",),
    default_bridge="br0",
    bridges=("br0",),
    tee_kinds=("simulated-tdx",),
    image_kinds=("fake",),
)


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeBackend:
    """records what the VMM asked; a CVM "runs" from launch until stop or `crash`."""

    capabilities: Capabilities = CAPS
    name: str = "fake"
    gpus: list[GpuDevice] = field(default_factory=list)
    attached: dict[str, int] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    launches: list[tuple[str, BootSpec]] = field(default_factory=list)
    stops: list[tuple[str, float]] = field(default_factory=list)
    cleanups: list[str] = field(default_factory=list)
    power_offs: list[str] = field(default_factory=list)
    prepared: bool = False
    closed: bool = False
    #: check_start refuses with this message
    refuse_start: str = ""
    #: what exit_detail says of a vm
    exit_details: dict[str, str] = field(default_factory=dict)
    #: stop() waits for this gate once it has set `stop_entered`
    stop_gate: asyncio.Event | None = None
    stop_entered: asyncio.Event = field(default_factory=asyncio.Event)

    def host_problems(self) -> list[str]:
        return []

    async def prepare(self) -> None:
        self.prepared = True

    async def close(self) -> None:
        self.closed = True

    def attach(self, vm: Vm) -> None:
        self.attached[vm.id] = max(self.attached.values(), default=2) + 1

    def detach(self, vm: Vm) -> None:
        self.attached.pop(vm.id, None)

    def host_api_channel(self, vm: Vm) -> HostApiChannel:
        return HostApiChannel(vm.workdir.path / "host-api" / "api.sock", "unix:/fake/host-api")

    def check_start(self, vm: Vm) -> None:
        if self.refuse_start:
            raise Refused(self.refuse_start)

    async def launch(self, vm: Vm, spec: BootSpec) -> None:
        assert vm.id in self.attached, "launch of a vm that was never attached"
        self.launches.append((vm.id, spec))
        self.running.add(vm.id)

    def is_alive(self, vm: Vm) -> bool:
        return vm.id in self.running

    def process(self, vm: Vm) -> ProcessInfo | None:
        if vm.id not in self.running:
            return None
        return ProcessInfo(4242, f"fake-cvm {vm.id}", vm.started_at)

    async def stop(self, vm: Vm, grace: float) -> None:
        self.stops.append((vm.id, grace))
        self.stop_entered.set()
        if self.stop_gate is not None:
            await self.stop_gate.wait()
        self.running.discard(vm.id)

    async def power_off(self, vm: Vm) -> None:
        self.power_offs.append(vm.id)

    async def cleanup(self, vm: Vm) -> None:
        self.cleanups.append(vm.id)

    def exit_detail(self, vm: Vm) -> str:
        return self.exit_details.get(vm.id, "")

    def interfaces(self, vm: Vm) -> list[InterfaceStatus]:
        return [InterfaceStatus("bridge", "fake", "02:00:00:00:00:01", "br0", "fake0")]

    def guest_api_address(self, vm: Vm) -> str | None:
        return None

    def list_gpus(self) -> list[GpuDevice]:
        return list(self.gpus)

    def crash(self, vm_id: str) -> None:
        self.running.discard(vm_id)

    def launched(self, vm_id: str) -> int:
        return sum(1 for v, _ in self.launches if v == vm_id)


def vmm_config(root: Path, **overrides: Any) -> VmmConfig:
    images = root / "images"
    (images / IMAGE).mkdir(parents=True, exist_ok=True)
    (images / IMAGE / "metadata.json").write_text(json.dumps({"kind": "fake", "version": "1.2"}))
    (images / IMAGE / "digest.txt").write_text("ab" * 32)
    base = VmmConfig(
        run_path=root / "run",
        image_path=images,
        mock_attestation_seed=SEED,
        auto_restart_enabled=False,
        auto_restart_initial_backoff=5.0,
        auto_restart_max_backoff=300.0,
        auto_restart_max_retries=3,
        port_mapping_enabled=True,
        port_ranges=(PortRange("tcp", 1024, 65535), PortRange("udp", 1024, 65535)),
    )
    return replace(base, **overrides)
