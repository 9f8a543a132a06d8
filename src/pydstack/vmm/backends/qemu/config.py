"""`[cvm.qemu]`: the qemu backend's own keys in vmm.toml (upstream's `[cvm]` QEMU keys, moved
under the backend's table).

[cvm.qemu]
qemu_path = ""                 # default: qemu-system-x86_64 on PATH
accel = "auto"                 # auto (kvm when /dev/kvm works, else tcg with a warning) | kvm | tcg
tdx = "auto"                   # auto (the host's kvm_intel tdx parameter) | off
host_share_mode = "9p"         # 9p | vvfat
networking_mode = "user"       # user (QEMU's slirp, port mappings as hostfwd) | bridge
bridge = ""                    # the host bridge of bridge mode (QEMU's bridge helper)
net = "10.0.2.0/24"            # user mode network
dhcp_start = "10.0.2.10"
restrict = false
min_free_memory_mb = 256       # refuse to start a CVM unless its memory and this much are free
boot_timeout = 300             # seconds to boot: past it, a boot error and the VM is stopped
use_mrconfigid = true          # TDX: MRCONFIGID over the compose hash
qgs_port = 4050                # TDX: the quote generation service's vsock port (0: none)
product_name = "dstack"        # SMBIOS type 1
sys_vendor = "dstack"
"""

from __future__ import annotations

import ipaddress
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydstack.errors import ConfigError

ACCELS = ("auto", "kvm", "tcg")
SHARE_MODES = ("9p", "vvfat")
NET_MODES = ("user", "bridge")


@dataclass(frozen=True)
class QemuConfig:
    qemu_path: str = ""
    accel: str = "auto"
    tdx: str = "auto"
    host_share_mode: str = "9p"
    networking_mode: str = "user"
    bridge: str = ""
    net: str = "10.0.2.0/24"
    dhcp_start: str = "10.0.2.10"
    restrict: bool = False
    min_free_memory_mb: int = 256
    boot_timeout: float = 300.0
    use_mrconfigid: bool = True
    qgs_port: int = 4050
    product_name: str = "dstack"
    sys_vendor: str = "dstack"

    def qemu(self) -> str:
        """the QEMU binary (its path); ConfigError when there is none."""
        path = self.qemu_path or shutil.which("qemu-system-x86_64") or ""
        if not path:
            raise ConfigError("qemu-system-x86_64 is not installed ([cvm.qemu] qemu_path)")
        return path

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> QemuConfig:
        """the `[cvm.qemu]` table; ConfigError naming the key for anything invalid."""
        d = cls()
        try:
            cfg = cls(
                qemu_path=str(table.get("qemu_path", d.qemu_path)),
                accel=str(table.get("accel", d.accel)),
                tdx=str(table.get("tdx", d.tdx)),
                host_share_mode=str(table.get("host_share_mode", d.host_share_mode)),
                networking_mode=str(table.get("networking_mode", d.networking_mode)),
                bridge=str(table.get("bridge", d.bridge)),
                net=str(ipaddress.ip_network(str(table.get("net", d.net)))),
                dhcp_start=str(ipaddress.ip_address(str(table.get("dhcp_start", d.dhcp_start)))),
                restrict=bool(table.get("restrict", d.restrict)),
                min_free_memory_mb=int(table.get("min_free_memory_mb", d.min_free_memory_mb)),
                boot_timeout=float(table.get("boot_timeout", d.boot_timeout)),
                use_mrconfigid=bool(table.get("use_mrconfigid", d.use_mrconfigid)),
                qgs_port=int(table.get("qgs_port", d.qgs_port)),
                product_name=str(table.get("product_name", d.product_name)),
                sys_vendor=str(table.get("sys_vendor", d.sys_vendor)),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"invalid [cvm.qemu]: {e}") from e
        if cfg.accel not in ACCELS:
            raise ConfigError(f"cvm.qemu.accel must be one of {', '.join(ACCELS)}")
        if cfg.tdx not in ("auto", "off"):
            raise ConfigError("cvm.qemu.tdx must be auto or off")
        if cfg.host_share_mode not in SHARE_MODES:
            raise ConfigError(f"cvm.qemu.host_share_mode must be one of {', '.join(SHARE_MODES)}")
        if cfg.networking_mode not in NET_MODES:
            raise ConfigError(f"cvm.qemu.networking_mode must be one of {', '.join(NET_MODES)}")
        if cfg.networking_mode == "bridge" and not cfg.bridge:
            raise ConfigError("cvm.qemu.bridge is required in bridge networking mode")
        if cfg.boot_timeout <= 0:
            raise ConfigError("cvm.qemu.boot_timeout must be positive")
        for key in ("bridge", "product_name", "sys_vendor", "qemu_path"):
            if "," in getattr(cfg, key):
                raise ConfigError(f"cvm.qemu.{key} must not contain a comma")
        return cfg
