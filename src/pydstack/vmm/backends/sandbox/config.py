"""`[cvm.sandbox]`: the sandbox backend's own keys in vmm.toml.

[cvm.sandbox]
bridge = "dstack0"             # host bridge CVMs attach to (1-15 characters)
subnet = "10.213.0.0/16"       # IPv4, /24 or larger; the host is its first address
scrypt_n = 10                  # log2 scrypt cost of each CVM's gocryptfs storage
min_free_memory_mb = 512       # refuse to start a CVM below this much free host memory
outbound = true                # CVMs may reach the outside world (masqueraded)
host_ports = []                # host ports on the bridge address CVMs may reach, besides
                               # those of the kms/gateway/pccs/registry urls
wireguard_ports = [51820]      # udp ports on the bridge address CVMs may send WireGuard to
                               # (the gateway's core.wg.listen_port), open only when
                               # [cvm] gateway_urls names a gateway
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydstack.errors import ConfigError


@dataclass(frozen=True)
class SandboxConfig:
    bridge: str = "dstack0"
    subnet: str = "10.213.0.0/16"
    scrypt_n: int = 10
    min_free_memory_mb: int = 512
    #: cvms may open connections to the outside world (masqueraded through the host)
    outbound: bool = True
    #: host ports on the bridge address cvms may reach besides those of kms/gateway/pccs urls
    host_ports: tuple[int, ...] = ()
    #: udp ports of a host gateway's WireGuard (open only when gateway_urls are configured)
    wireguard_ports: tuple[int, ...] = (51820,)

    @property
    def host_ip(self) -> str:
        """the host's address on the bridge, as CVMs see it (10.0.2.2 under QEMU)."""
        return str(ipaddress.ip_network(self.subnet).network_address + 1)

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> SandboxConfig:
        """the `[cvm.sandbox]` table; ConfigError naming the key for anything invalid."""
        d = cls()
        try:
            host_ports = tuple(int(x) for x in table.get("host_ports", []))
            wg_ports = tuple(int(x) for x in table.get("wireguard_ports", d.wireguard_ports))
            net = ipaddress.ip_network(str(table.get("subnet", d.subnet)))
            scrypt_n = int(table.get("scrypt_n", d.scrypt_n))
            min_free = int(table.get("min_free_memory_mb", d.min_free_memory_mb))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"invalid [cvm.sandbox]: {e}") from e
        if any(not 0 < x < 65536 for x in host_ports):
            raise ConfigError("cvm.sandbox.host_ports must be ports (1-65535)")
        if any(not 0 < x < 65536 for x in wg_ports):
            raise ConfigError("cvm.sandbox.wireguard_ports must be ports (1-65535)")
        if net.version != 4 or net.prefixlen > 24:
            raise ConfigError("cvm.sandbox.subnet must be an IPv4 network of /24 or larger")
        bridge = str(table.get("bridge", d.bridge))
        if not 0 < len(bridge) <= 15:
            raise ConfigError("cvm.sandbox.bridge must be a 1-15 character interface name")
        return cls(
            bridge=bridge,
            subnet=str(net),
            scrypt_n=scrypt_n,
            min_free_memory_mb=min_free,
            outbound=bool(table.get("outbound", d.outbound)),
            host_ports=host_ports,
            wireguard_ports=wg_ports,
        )
