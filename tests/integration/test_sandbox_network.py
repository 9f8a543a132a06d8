"""the sandbox bridge keeps one address while CVMs come and go (real `ip`, namespaces, sockets).

A bridge left to choose its own address takes the lowest one among its ports. Each CVM that
joined with a lower veth address, or the lowest one leaving, moved it, and every other CVM went
on sending to the old address from its neighbour cache: its connections to the host (kms,
registry, gateway) timed out for up to half a minute. The suite caught it once, as a CVM whose
kms connections timed out right after a neighbour booted.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pydstack.vmm.backends.sandbox.network import (
    bridge_mac_for,
    ensure_bridge,
    ip,
    setup_network,
    teardown_bridge,
    teardown_network,
)

pytestmark = pytest.mark.integration

TAG = f"{os.getpid() % 10000:04d}"
BRIDGE, SUBNET, HOST = f"dsnet{TAG}", "10.212.0.0/16", "10.212.0.1"
#: lower than any address a bridge derives or the kernel draws for a veth
LOWEST = "02:00:00:00:00:00"


def link_address(name: str) -> str:
    out = ip("-o", "link", "show", name).stdout.split()
    return out[out.index("link/ether") + 1]


def connects(netns: str, port: int) -> bool:
    """whether a tcp connection from `netns` to the host's bridge address succeeds (2 s)."""
    probe = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 2)"
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-c", probe, HOST, str(port)],
        capture_output=True,
        timeout=30,
    )
    return out.returncode == 0


@pytest.fixture
def listener() -> Iterator[int]:
    teardown_bridge(BRIDGE, SUBNET)
    ensure_bridge(BRIDGE, SUBNET)
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen(64)
        try:
            yield s.getsockname()[1]
        finally:
            for k in range(3):
                teardown_network(f"dsnet{TAG}n{k}", f"dn{TAG}v{k}")
            teardown_bridge(BRIDGE, SUBNET)


def cvm(k: int, mac: str | None = None) -> str:
    """a cvm's namespace at .<10+k>, its host-side veth given `mac` when one is named."""
    netns, veth = f"dsnet{TAG}n{k}", f"dn{TAG}v{k}"
    setup_network(f"vm-{TAG}-{k}", netns, veth, BRIDGE, f"10.212.0.{10 + k}/16", HOST)
    if mac:
        ip("link", "set", veth, "address", mac)
    return netns


def test_cvms_keep_reaching_the_host_while_neighbours_join_and_leave(listener):
    a = cvm(0)
    assert connects(a, listener)  # a learns the bridge's address
    b = cvm(1, LOWEST)  # a port that sorts below everything else joins
    assert link_address(BRIDGE) == bridge_mac_for(BRIDGE)
    assert connects(a, listener)
    assert connects(b, listener)
    teardown_network(b, f"dn{TAG}v1")  # and the lowest port leaves
    assert link_address(BRIDGE) == bridge_mac_for(BRIDGE)
    assert connects(a, listener)


def test_a_bridge_made_before_the_fix_gets_its_address_pinned(listener):
    teardown_bridge(BRIDGE, SUBNET)
    ip("link", "add", BRIDGE, "type", "bridge")  # as earlier versions made it
    cvm(2, LOWEST)
    assert link_address(BRIDGE) == LOWEST
    ensure_bridge(BRIDGE, SUBNET)
    assert link_address(BRIDGE) == bridge_mac_for(BRIDGE)
    ensure_bridge(BRIDGE, SUBNET)  # idempotent
    assert link_address(BRIDGE) == bridge_mac_for(BRIDGE)


def test_bridge_addresses_are_stable_local_unicast():
    mac = bridge_mac_for("dstack0")
    assert mac == bridge_mac_for("dstack0") != bridge_mac_for("dstack1")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01
