"""the sandbox's host network: one bridge CVMs attach to, its filter policy, and each CVM's
network namespace joined to the bridge by a veth pair.

Everything here runs `ip` and `iptables` and needs root; a failing command raises
:class:`SandboxError` with the tool's own message.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

from pydstack.vmm.errors import BackendError

log = logging.getLogger("dstack-sandbox")


class SandboxError(BackendError):
    """the host cannot set up a sandbox CVM."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise SandboxError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def bridge_mac_for(name: str) -> str:
    """the bridge's own address: locally administered, derived from its name.

    A bridge left to choose takes the lowest address among its ports, so it changed each time
    a CVM whose veth sorts lower joined or the lowest one left; every other CVM kept the old
    address in its neighbour cache for the host (kms, registry, gateway) and its packets went
    nowhere until that entry expired, up to half a minute. A set address stays put.
    """
    return _local_mac(b"dstack-bridge:" + name.encode())


def _local_mac(seed: bytes) -> str:
    """a locally administered unicast address made from `seed`."""
    digest = hashlib.sha256(seed).digest()
    return ":".join(f"{b:02x}" for b in (b"\x02" + digest[:5]))


def ensure_bridge(name: str, subnet: str) -> None:
    """the host bridge CVMs attach to, with a fixed address of its own (`bridge_mac_for`) and
    the host's IP address on it (idempotent)."""
    net = ipaddress.ip_network(subnet)
    host = f"{net.network_address + 1}/{net.prefixlen}"
    mac = bridge_mac_for(name)
    if ip("link", "show", name, check=False).returncode != 0:
        ip("link", "add", name, "address", mac, "type", "bridge")
    elif mac not in ip("link", "show", name).stdout:
        # a bridge made before its address was fixed: pinned once, from now on
        ip("link", "set", name, "address", mac)
    addrs = ip("-j", "addr", "show", name).stdout
    if host.split("/")[0] not in addrs:
        ip("addr", "add", host, "dev", name)
    ip("link", "set", name, "up")


def _iptables(*args: str, table: str = "filter", check: bool = True) -> bool:
    proc = subprocess.run(
        ["iptables", "-w", "-t", table, *args], capture_output=True, text=True, check=False
    )
    if check and proc.returncode != 0:
        raise SandboxError(f"iptables {' '.join(args)}: {proc.stderr.strip()}")
    return proc.returncode == 0


def _chains(bridge: str) -> tuple[str, str]:
    return f"DS-IN-{bridge}", f"DS-FWD-{bridge}"


def apply_bridge_policy(
    bridge: str,
    subnet: str,
    host_ports: Iterable[int],
    *,
    outbound: bool = True,
    udp_ports: Iterable[int] = (),
) -> None:
    """what CVMs on `bridge` may reach: on the host only `host_ports` (tcp and udp) and
    `udp_ports` (a gateway's WireGuard) at the bridge address, never each other (ports are
    isolated on the bridge and routed traffic between them is dropped), nothing may open a
    connection into them through the host, and the outside world (masqueraded) only when
    `outbound`. Rebuilt from scratch each call.

    Without iptables the host cannot enforce this, and a CVM could reach every host listener:
    that is refused rather than run open.
    """
    if shutil.which("iptables") is None:
        raise SandboxError("iptables is missing: cannot keep cvms away from host services")
    net = ipaddress.ip_network(subnet)
    host_ip = str(net.network_address + 1)
    chain_in, chain_fwd = _chains(bridge)
    for chain in (chain_in, chain_fwd):
        if not _iptables("-N", chain, check=False):
            _iptables("-F", chain)
    for parent, direction in (("INPUT", "-i"), ("FORWARD", "-i"), ("FORWARD", "-o")):
        target = chain_in if parent == "INPUT" else chain_fwd
        rule = [parent, direction, bridge, "-j", target]
        if not _iptables("-C", *rule, check=False):
            _iptables("-I", *rule)
    established = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]
    _iptables("-A", chain_in, *established)
    for port in sorted(set(host_ports)):
        for proto in ("tcp", "udp"):
            _iptables(
                "-A", chain_in, "-d", host_ip, "-p", proto, "--dport", str(port), "-j", "ACCEPT"
            )
    for port in sorted(set(udp_ports) - set(host_ports)):
        _iptables("-A", chain_in, "-d", host_ip, "-p", "udp", "--dport", str(port), "-j", "ACCEPT")
    _iptables("-A", chain_in, "-p", "icmp", "--icmp-type", "echo-request", "-j", "ACCEPT")
    _iptables("-A", chain_in, "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset")
    _iptables("-A", chain_in, "-j", "REJECT")
    _iptables("-A", chain_fwd, "-i", bridge, "-o", bridge, "-j", "DROP")
    _iptables("-A", chain_fwd, "-o", bridge, *established)
    _iptables("-A", chain_fwd, "-o", bridge, "-j", "DROP")
    _iptables("-A", chain_fwd, "-i", bridge, "-j", "ACCEPT" if outbound else "DROP")
    nat = ["POSTROUTING", "-s", str(net), "!", "-o", bridge, "-j", "MASQUERADE"]
    present = _iptables("-C", *nat, table="nat", check=False)
    if outbound and not present:
        _iptables("-A", *nat, table="nat")
    elif not outbound and present:
        _iptables("-D", *nat, table="nat")
    if outbound:
        forward = Path("/proc/sys/net/ipv4/ip_forward")
        with contextlib.suppress(OSError):
            if forward.read_text().strip() != "1":
                log.info("enabling ipv4 forwarding for cvm traffic")
                forward.write_text("1\n")


def teardown_bridge(bridge: str, subnet: str) -> None:
    """remove the bridge, its filter chains and its NAT rule (what ensure_bridge and
    apply_bridge_policy made)."""
    if shutil.which("iptables") is not None:
        chain_in, chain_fwd = _chains(bridge)
        for parent, direction, target in (
            ("INPUT", "-i", chain_in),
            ("FORWARD", "-i", chain_fwd),
            ("FORWARD", "-o", chain_fwd),
        ):
            while _iptables("-D", parent, direction, bridge, "-j", target, check=False):
                pass
        for chain in (chain_in, chain_fwd):
            _iptables("-F", chain, check=False)
            _iptables("-X", chain, check=False)
        nat = ["POSTROUTING", "-s", subnet, "!", "-o", bridge, "-j", "MASQUERADE"]
        while _iptables("-D", *nat, table="nat", check=False):
            pass
    ip("link", "del", bridge, check=False)


def ports_of_urls(urls: Iterable[str]) -> set[int]:
    """the ports named by service urls (default 443 for https, 80 for http)."""
    out: set[int] = set()
    for url in urls:
        if not url:
            continue
        parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        try:
            port = parsed.port
        except ValueError:
            continue
        out.add(port or (443 if parsed.scheme == "https" else 80))
    return out


def mac_for(vm_id: str) -> str:
    """the CVM's eth0 address: locally administered, stable across restarts."""
    return _local_mac(vm_id.encode())


def names_for(vm_id: str) -> tuple[str, str]:
    """the CVM's network namespace and host-side veth names (stable, within IFNAMSIZ)."""
    short = vm_id.replace("-", "")[:10]
    return f"dstack-{short}", f"ds{short}"


def teardown_network(netns: str, veth: str) -> None:
    ip("link", "del", veth, check=False)
    ip("netns", "del", netns, check=False)


def setup_network(
    vm_id: str, netns: str, veth: str, bridge: str, address: str, gateway: str
) -> None:
    """the CVM's namespace `netns` with eth0 at `address` (with prefix), routed via `gateway`,
    its host end `veth` an isolated port of `bridge`; nothing is left behind on failure."""
    teardown_network(netns, veth)
    peer = "p" + veth[1:]
    ip("netns", "add", netns)
    try:
        ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", netns)
        ip("link", "set", veth, "master", bridge)
        # an isolated bridge port talks to the host, never to another cvm's port
        ip("link", "set", "dev", veth, "type", "bridge_slave", "isolated", "on")
        ip("link", "set", veth, "up")
        ip("-n", netns, "link", "set", peer, "name", "eth0")
        ip("-n", netns, "link", "set", "eth0", "address", mac_for(vm_id))
        ip("-n", netns, "addr", "add", address, "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "route", "add", "default", "via", gateway)
    except SandboxError:
        teardown_network(netns, veth)
        raise
