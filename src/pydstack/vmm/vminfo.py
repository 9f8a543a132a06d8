"""VmInfo: what Status and GetInfo report about one VM (upstream's fields and words).

`uptime` and `exited_at` are humantime durations ("3m 2s") or "never"; `configuration` is the
VM as created and updated, read back from its manifest and host share, and left unset (JSON
null) in a brief listing.
"""

from __future__ import annotations

from pydstack.rpc.proto import vmm_rpc_pb2 as pb
from pydstack.types import hostshare as hs

from .backends import InterfaceStatus
from .validate import humantime
from .vm import Vm


def configuration(vm: Vm) -> pb.VmConfiguration:
    m = vm.manifest
    wd = vm.workdir
    cfg = pb.VmConfiguration(
        name=m.name,
        image=m.image,
        compose_file=(wd.read_shared(hs.APP_COMPOSE) or b"").decode(),
        encrypted_env=wd.read_shared(hs.ENCRYPTED_ENV) or b"",
        user_config=(wd.read_shared(hs.USER_CONFIG) or b"").decode(),
        vcpu=m.vcpu,
        memory=m.memory,
        disk_size=m.disk_size,
        app_id=m.app_id,
        kms_urls=m.kms_urls,
        gateway_urls=m.gateway_urls,
        stopped=not wd.started(),
        no_tee=m.no_tee,
        hugepages=m.hugepages,
        pin_numa=m.pin_numa,
        ports=[
            pb.PortMapping(
                protocol=p.protocol,
                host_port=p.host_port,
                vm_port=p.vm_port,
                host_address=p.address,
            )
            for p in m.port_map
        ],
        networks=[pb.NetworkingConfig(mode=n.mode, bridge_name=n.bridge_name) for n in m.networks],
    )
    if m.simulated_tee:
        cfg.simulated_tee = m.simulated_tee
    if m.gpus.any:
        cfg.gpus.attach_mode = m.gpus.attach_mode
        cfg.gpus.gpus.extend(pb.GpuSpec(slot=s) for s in m.gpus.slots)
    return cfg


def vm_info(
    vm: Vm,
    *,
    status: str,
    image_version: str,
    interfaces: list[InterfaceStatus],
    now: float,
    brief: bool = False,
) -> pb.VmInfo:
    """the VmInfo of `vm` in `status` at wall-clock time `now`."""
    m = vm.manifest
    up = status in ("running", "stopping") and vm.started_at
    info = pb.VmInfo(
        id=m.id,
        name=m.name,
        status=status,
        uptime=humantime(now - vm.started_at) if up else "never",
        app_id=m.app_id,
        boot_progress=vm.runtime.boot_progress,
        boot_error=vm.runtime.boot_error,
        shutdown_progress=vm.runtime.shutdown_progress,
        image_version=image_version,
        exited_at=humantime(now - vm.exited_at) if vm.exited_at else "never",
    )
    iid = vm.workdir.instance_id()
    if iid:
        info.instance_id = iid
    for e in vm.runtime.events:
        info.events.append(pb.GuestEvent(event=e.event, body=e.payload, timestamp=e.timestamp_ms))
    for i in interfaces:
        iface = pb.NetworkInterfaceStatus(mode=i.mode, backend=i.backend, mac=i.mac)
        if i.bridge_name is not None:
            iface.bridge_name = i.bridge_name
        if i.netdev_id is not None:
            iface.netdev_id = i.netdev_id
        info.interfaces.append(iface)
    if not brief:
        info.configuration.CopyFrom(configuration(vm))
    return info
