"""what the VMM checks before it creates or changes a VM: names, ports, resources, and every
field against the backend's capabilities. Each check raises :class:`Refused` (or
:class:`Unsupported`, naming the field) and changes nothing; a field the backend cannot honour
is refused, never dropped.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence

from pydstack.rpc.proto import vmm_rpc_pb2 as pb

from . import hostshare
from .backends import CvmBackend
from .compose import PortMapping
from .config import VmmConfig
from .errors import Refused, Unsupported
from .images import Image
from .validate import validate_app_compose
from .vm import Vm
from .workdir import GpuSelection, NetworkSpec, VmManifest, new_vm_id

NAME_RE = re.compile(r"^[A-Za-z0-9\-_. @~!$^()]{1,64}$")
#: upstream's simulated_tee values, and the TEE kind each needs from the backend
SIMULATED_TEES = {"dstack-tdx": "simulated-tdx"}
#: upstream's own networking mode, never accepted through the API
CUSTOM_MODE = "custom"


def port_free(p: PortMapping) -> bool:
    """whether the host port of `p` can be bound now."""
    kind = socket.SOCK_DGRAM if p.protocol == "udp" else socket.SOCK_STREAM
    family = socket.AF_INET6 if ":" in p.address else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((p.address, p.host_port))
        except OSError:
            return False
    return True


class Admission:
    """checks against this VMM's config, its backend and the VMs it holds."""

    def __init__(
        self,
        config: VmmConfig,
        backend: CvmBackend,
        vms: Mapping[str, Vm],
        is_port_free: Callable[[PortMapping], bool] = port_free,
    ) -> None:
        self.config = config
        self.backend = backend
        self.vms = vms
        self.is_port_free = is_port_free

    @property
    def _who(self) -> str:
        return f"the {self.backend.name} backend"

    def create(self, req: pb.VmConfiguration, images: Mapping[str, Image]) -> VmManifest:
        """CreateVm: every field checked, each one the backend cannot honour refused; the
        manifest of the new VM (a fresh id, defaults filled in)."""
        self.name(req.name)
        if req.image not in images:
            known = ", ".join(sorted(images)) or "none"
            raise Refused(f"image {req.image!r} not found (available: {known})")
        validate_app_compose(req.compose_file)
        if len(req.encrypted_env) > hostshare.MAX_ENV:
            raise Refused("encrypted env too large")
        if len(req.user_config) > hostshare.MAX_USER_CONFIG:
            raise Refused("user config too large")
        vcpu, memory = req.vcpu or 1, req.memory or 1024
        self.vcpu(vcpu)
        self.memory(memory)
        self.room_for_one_more()
        self.features(hugepages=req.hugepages, pin_numa=req.pin_numa)
        gpus = self.gpus(req.gpus)
        simulated = req.simulated_tee if req.HasField("simulated_tee") else None
        no_tee, simulated_tee = self.tee(req.no_tee, simulated)
        if req.networks:  # upstream: `networks` wins over the legacy single `networking`
            networks = self.networks(req.networks, "networks")
        elif req.HasField("networking"):
            networks = self.networks([req.networking], "networking")
        else:
            networks = []
        ports = self.port_mappings(req.ports)
        self.ports(ports)
        app_id = (
            req.app_id.removeprefix("0x").lower()
            if req.HasField("app_id") and req.app_id
            else hashlib.sha256(req.compose_file.encode()).hexdigest()[:40]
        )
        if not re.fullmatch(r"[0-9a-f]{40}", app_id):
            raise Refused("app_id must be 20 bytes of hex")
        return VmManifest(
            id=new_vm_id(),
            name=req.name,
            app_id=app_id,
            vcpu=vcpu,
            memory=memory,
            disk_size=req.disk_size or 20,
            image=req.image,
            port_map=ports,
            kms_urls=list(req.kms_urls),
            gateway_urls=list(req.gateway_urls),
            no_tee=no_tee,
            simulated_tee=simulated_tee,
            networks=networks,
            hugepages=req.hugepages,
            pin_numa=req.pin_numa,
            gpus=gpus,
        )

    # ------------------------------------------------------------------ names and counts
    def name(self, name: str, exclude: str | None = None) -> None:
        if not NAME_RE.match(name):
            raise Refused(
                "invalid vm name: 1-64 characters of letters, digits, space and - _ . @ ~ ! $ ^ ( )"
            )
        for vm in self.vms.values():
            if vm.manifest.name == name and vm.id != exclude and not vm.removing:
                raise Refused(f"a vm named {name!r} already exists")

    def room_for_one_more(self) -> None:
        if len(self.vms) >= self.config.max_cvm_number:
            raise Refused(f"too many vms (max {self.config.max_cvm_number})")

    def vcpu(self, vcpu: int) -> None:
        top = self.config.max_allocable_vcpu
        if not 0 < vcpu <= top:
            raise Refused(f"invalid vcpu count {vcpu} (1 to {top})")

    def memory(self, memory_mb: int) -> None:
        top = self.config.max_allocable_memory_in_mb
        if not 0 < memory_mb <= top:
            raise Refused(f"invalid memory size {memory_mb} MB (1 to {top})")

    # ------------------------------------------------------------------ ports
    def port_mappings(self, ports: Iterable[pb.PortMapping]) -> list[PortMapping]:
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

    def ports(self, ports: list[PortMapping], *, vm: Vm | None = None) -> None:
        """the one validation of port mappings, for CreateVm and UpdateVm alike: mapping
        enabled and offered by the backend, a protocol it forwards, an ip address, a host port in
        a configured range, no duplicate, not used by another vm, free on the host (a port `vm`
        already holds counts as free)."""
        c = self.config
        caps = self.backend.capabilities
        if not ports:
            return
        if not c.port_mapping_enabled:
            raise Refused("port mapping is disabled on this host")
        if not caps.port_mapping:
            raise Unsupported("ports", f"{self._who} cannot forward host ports")
        held = {(q.protocol, q.address, q.host_port) for q in vm.manifest.port_map} if vm else set()
        seen: set[tuple[str, int]] = set()
        for p in ports:
            if p.protocol not in caps.port_protocols:
                raise Refused(
                    f"invalid protocol {p.protocol!r}: {' or '.join(caps.port_protocols)}"
                )
            if not (0 < p.host_port < 65536 and 0 < p.vm_port < 65536):
                raise Refused(f"port out of range: {p.host_port}:{p.vm_port}")
            try:
                ipaddress.ip_address(p.address)
            except ValueError:
                raise Refused(f"invalid host address {p.address!r}") from None
            if not any(
                r.protocol == p.protocol and r.start <= p.host_port <= r.end for r in c.port_ranges
            ):
                raise Refused(
                    f"host port {p.protocol}/{p.host_port} is outside the allowed ranges "
                    "([cvm.port_mapping] range)"
                )
            key = (p.protocol, p.host_port)
            if key in seen:
                raise Refused(f"port {p.protocol}/{p.host_port} is mapped twice")
            seen.add(key)
            for other in self.vms.values():
                if vm is not None and other.id == vm.id:
                    continue
                if any((q.protocol, q.host_port) == key for q in other.manifest.port_map):
                    raise Refused(
                        f"port {p.protocol}/{p.host_port} is already used by vm "
                        f"{other.manifest.name}"
                    )
            if (p.protocol, p.address, p.host_port) in held:
                continue
            if not self.is_port_free(p):
                raise Refused(f"port {p.protocol}/{p.address}:{p.host_port} is in use on the host")

    # ------------------------------------------------------------------ capabilities
    def networks(self, specs: Sequence[pb.NetworkingConfig], field: str) -> list[NetworkSpec]:
        """the requested interfaces (`field` names them in errors); empty: the default one."""
        caps = self.backend.capabilities
        if len(specs) > caps.max_networks:
            raise Unsupported(
                field, f"{self._who} gives a cvm at most {caps.max_networks} interface(s)"
            )
        out = []
        for n in specs:
            mode = n.mode or caps.default_networking_mode
            if mode == CUSTOM_MODE:
                raise Refused(f"{field}: mode 'custom' cannot be requested through the api")
            if mode not in caps.networking_modes:
                raise Unsupported(
                    field,
                    f"mode {mode!r} is not supported by {self._who} "
                    f"(supported: {', '.join(caps.networking_modes)})",
                )
            if n.bridge_name:
                if mode != "bridge":
                    raise Refused(f"{field}: bridge_name is only valid in bridge mode")
                if n.bridge_name not in caps.bridges:
                    raise Unsupported(
                        field,
                        f"bridge {n.bridge_name!r} is not available "
                        f"(available: {', '.join(caps.bridges) or 'none'})",
                    )
            out.append(NetworkSpec(n.mode, n.bridge_name))
        return out

    def gpus(self, g: pb.GpuConfig) -> GpuSelection:
        """the GPUs asked for; asking for none is always honoured."""
        caps = self.backend.capabilities
        mode = g.attach_mode or "listed"
        if mode not in ("listed", "all"):
            raise Refused(f"gpus: attach_mode {mode!r}: listed or all")
        slots = tuple(s.slot for s in g.gpus)
        sel = GpuSelection(mode, slots if mode == "listed" else ())
        if not sel.any:
            return sel
        if not caps.gpus:
            raise Unsupported("gpus", f"{self._who} cannot attach gpus")
        if mode == "all":
            if not caps.allow_attach_all_gpus:
                raise Unsupported("gpus", "attaching all gpus is not allowed on this host")
            return sel
        if len(set(slots)) != len(slots):
            raise Refused("gpus: a slot is listed twice")
        known = {d.slot for d in self.backend.list_gpus()}
        for slot in slots:
            if slot not in known:
                raise Refused(f"gpus: no gpu at slot {slot!r} on this host")
        return sel

    def features(self, *, hugepages: bool, pin_numa: bool) -> None:
        caps = self.backend.capabilities
        if hugepages and not caps.hugepages:
            raise Unsupported("hugepages", f"{self._who} cannot back cvm memory with hugepages")
        if pin_numa and not caps.pin_numa:
            raise Unsupported("pin_numa", f"{self._who} cannot pin a cvm to a numa node")

    def tee(self, no_tee: bool, simulated_tee: str | None) -> tuple[bool, str | None]:
        """(no_tee, simulated_tee) as the CVM will run. A simulated TEE runs without a hardware
        one; where the backend has no hardware TEE its simulated TD stands in for a requested
        one (upstream's development setup, which is what such a backend is)."""
        caps = self.backend.capabilities
        if simulated_tee:
            kind = SIMULATED_TEES.get(simulated_tee)
            if kind is None:
                raise Unsupported(
                    "simulated_tee",
                    f"{simulated_tee!r} is not supported ({', '.join(SIMULATED_TEES)})",
                )
            if kind not in caps.tee_kinds:
                raise Unsupported("simulated_tee", f"{self._who} has no {kind}")
            return True, simulated_tee
        if caps.hardware_tee:
            if no_tee and not caps.no_tee:
                raise Unsupported("no_tee", f"{self._who} runs every cvm under a tee")
            return no_tee, None
        if "simulated-tdx" in caps.tee_kinds and caps.simulate_tee_requests:
            return True, "dstack-tdx"
        if not no_tee:
            raise Unsupported(
                "no_tee",
                f"this host has no tdx for {self._who}: deploy with --simulated-tee dstack-tdx "
                "(the vmm's simulated td) or --no-tee",
            )
        if not no_tee:
            raise Unsupported("no_tee", f"{self._who} has no tee: set no_tee")
        return True, None
