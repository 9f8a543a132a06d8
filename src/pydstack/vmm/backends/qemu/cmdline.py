"""the QEMU command line of one CVM boot, in upstream's order (the device order fixes the
ACPI tables a TD measures): accelerator and CPU, serial console with its log, QMP, firmware,
kernel and initrd, the read-only rootfs, the data disk, the NICs (user mode with the port
mappings as `hostfwd`, or a bridge), SMBIOS, vsock, the host share (9p or vvfat), the machine
(`q35` with the `tdx-guest` object and its `mrconfigid` under TDX, the no-TEE machine
otherwise), `-smp`, `-m` and the kernel command line.

Where this host differs from upstream's, on purpose: `-accel tcg -cpu max` when KVM does not
work, `-no-reboot` (a guest that panics ends its QEMU instead of rebooting forever), and without
vsock the VM's host-API channel is a `guestfwd` on its own user-mode network to its own socket
on the host, and its guest API a loopback `hostfwd` (:class:`QemuLaunch`).

Pure: values in, argv out. ValueError for a value that cannot be put on a QEMU command line.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ...compose import PortMapping

#: the guest-side address of the host-API forward (QEMU's user network; see guestfwd)
HOST_API_GUEST_ADDR = "10.0.2.100"
HOST_API_GUEST_PORT = 8000


@dataclass(frozen=True)
class Nic:
    mode: str  # user | bridge
    bridge: str = ""


@dataclass(frozen=True)
class QemuLaunch:
    """one boot's inputs, as the backend resolved them."""

    qemu: str
    workdir: Path
    vm_id: str
    bios: Path | None
    kernel: Path
    initrd: Path
    rootfs: Path | None
    cmdline: str
    vcpu: int
    memory_mb: int
    accel: str = "kvm"
    nics: tuple[Nic, ...] = (Nic("user"),)
    ports: tuple[PortMapping, ...] = ()
    net: str = "10.0.2.0/24"
    dhcp_start: str = "10.0.2.10"
    restrict: bool = False
    #: a host socket the guest reaches at HOST_API_GUEST_ADDR:HOST_API_GUEST_PORT (no vsock)
    host_api_socket: Path | None = None
    #: (host loopback port, guest port) of the guest API forward (no vsock)
    guest_api_forward: tuple[int, int] | None = None
    vsock_cid: int | None = None
    host_share_mode: str = "9p"
    shared_ro: bool = True
    smbios: tuple[tuple[int, tuple[tuple[str, str], ...]], ...] = (
        (1, (("manufacturer", "dstack"), ("product", "dstack"))),
    )
    tdx: bool = False
    mrconfigid: str | None = None
    qgs_port: int | None = None
    no_reboot: bool = True
    extra: tuple[str, ...] = field(default_factory=tuple)

    @property
    def serial_log(self) -> Path:
        return self.workdir / "serial.log"

    @property
    def qmp_socket(self) -> Path:
        return self.workdir / "qmp.sock"

    @property
    def hda(self) -> Path:
        return self.workdir / "hda.img"

    @property
    def shared_dir(self) -> Path:
        return self.workdir / "shared"


def _safe(value: str | Path, what: str) -> str:
    text = str(value)
    if "," in text or "\n" in text:
        raise ValueError(f"{what} {text[:80]!r} cannot be passed to qemu (a comma or newline)")
    return text


def mac_address(vm_id: str, index: int, prefix: bytes = b"") -> str:
    """upstream's MAC of a VM's NIC `index`: the prefix (at most 3 bytes), then
    sha256(vm_id) (or sha256("vm_id:index")), locally administered and unicast."""
    data = vm_id if index == 0 else f"{vm_id}:{index}"
    digest = hashlib.sha256(data.encode()).digest()
    p = prefix[:3]
    mac = bytearray(p + digest[: 6 - len(p)])
    mac[0] = (mac[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in mac)


def mr_config_id_b64(compose_hash: bytes) -> str:
    """upstream's v1 MRCONFIGID (0x01, the compose hash, zeros to 48 bytes), base64."""
    if len(compose_hash) != 32:
        raise ValueError("a compose hash is 32 bytes")
    return base64.b64encode(b"\x01" + compose_hash + bytes(15)).decode()


def _user_netdev(p: QemuLaunch, index: int, first_user: bool) -> str:
    netdev = (
        f"user,id=net{index},net={p.net},dhcpstart={p.dhcp_start},"
        f"restrict={'yes' if p.restrict else 'no'}"
    )
    if not first_user:
        return netdev
    for m in p.ports:
        netdev += f",hostfwd={m.protocol}:{_safe(m.address, 'address')}:{m.host_port}-:{m.vm_port}"
    if p.guest_api_forward is not None:
        host_port, guest_port = p.guest_api_forward
        netdev += f",hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}"
    if p.host_api_socket is not None:
        sock = _safe(p.host_api_socket, "host api socket")
        cmd = f"socat STDIO UNIX-CONNECT:{shlex.quote(sock)}"
        netdev += f",guestfwd=tcp:{HOST_API_GUEST_ADDR}:{HOST_API_GUEST_PORT}-cmd:{cmd}"
    return netdev


def qemu_command(p: QemuLaunch) -> list[str]:
    wd = p.workdir
    cpu = "host" if p.accel == "kvm" else "max"
    args = [p.qemu, "-accel", p.accel, "-cpu", cpu, "-nographic", "-nodefaults"]
    if p.no_reboot:
        args += ["-no-reboot"]
    args += [
        "-chardev",
        f"pty,id=com0,path={_safe(wd / 'serial.pty', 'path')},"
        f"logfile={_safe(p.serial_log, 'path')},logappend=on",
        "-serial",
        "chardev:com0",
    ]
    args += ["-qmp", f"unix:{_safe(p.qmp_socket, 'path')},server,wait=off"]
    if p.bios is not None:
        args += ["-bios", str(p.bios)]
    args += ["-kernel", str(p.kernel), "-initrd", str(p.initrd)]
    if p.rootfs is not None:
        args += [
            "-drive",
            f"file={_safe(p.rootfs, 'rootfs')},if=none,id=hd0,format=raw,readonly=on",
            "-device",
            "virtio-blk-pci,drive=hd0",
        ]
    args += ["-drive", f"file={_safe(p.hda, 'path')},if=none,id=hd1"]
    args += ["-device", "virtio-blk-pci,drive=hd1"]
    first_user = next((i for i, n in enumerate(p.nics) if n.mode == "user"), None)
    for i, nic in enumerate(p.nics):
        if nic.mode == "user":
            netdev = _user_netdev(p, i, i == first_user)
        elif nic.mode == "bridge":
            netdev = f"bridge,id=net{i},br={_safe(nic.bridge, 'bridge')}"
        else:
            raise ValueError(f"networking mode {nic.mode!r} is not supported")
        args += ["-netdev", netdev]
        args += ["-device", f"virtio-net-pci,netdev=net{i},mac={mac_address(p.vm_id, i)}"]
    for kind, fields in p.smbios:
        if fields:
            values = ",".join(f"{k}={_safe(v, 'smbios value')}" for k, v in fields)
            args += ["-smbios", f"type={kind},{values}"]
    if p.vsock_cid is not None:
        args += ["-device", f"vhost-vsock-pci,guest-cid={p.vsock_cid}"]
    shared = _safe(p.shared_dir, "path")
    if p.host_share_mode == "9p":
        ro = "on" if p.shared_ro else "off"
        args += [
            "-virtfs",
            f"local,path={shared},mount_tag=host-shared,readonly={ro},"
            "security_model=mapped,id=virtfs0",
        ]
    elif p.host_share_mode == "vvfat":
        args += [
            "-blockdev",
            f"driver=vvfat,node-name=vvfat0,read-only=on,dir={shared},label=DSTACKSHR",
            "-device",
            "virtio-blk-pci,drive=vvfat0",
        ]
    else:
        raise ValueError(f"host share mode {p.host_share_mode!r} is not supported")
    if p.tdx:
        args += ["-machine", "q35,kernel-irqchip=split,confidential-guest-support=tdx,hpet=off"]
        obj: dict[str, object] = {"qom-type": "tdx-guest", "id": "tdx"}
        if p.mrconfigid:
            obj["mrconfigid"] = p.mrconfigid
        if p.qgs_port:
            obj["quote-generation-socket"] = {"type": "vsock", "cid": "2", "port": str(p.qgs_port)}
        args += ["-object", json.dumps(obj, separators=(",", ":"))]
    else:
        args += ["-machine", "q35,kernel-irqchip=split,hpet=off"]
    args += [*p.extra]
    args += ["-smp", str(p.vcpu), "-m", f"{p.memory_mb}M"]
    if p.cmdline:
        args += ["-append", p.cmdline]
    return args
