"""the gateway's WireGuard facts: the §3.1 network checks, first-free allocation, keys, the
rendered config, the parsed handshakes and the handshake cache."""

from __future__ import annotations

import base64
import shutil
import subprocess

import pytest

from pydstack.errors import ConfigError
from pydstack.gateway.wgconf import (
    HandshakeCache,
    IpPoolExhausted,
    WgKeyError,
    WgNetwork,
    WgPeer,
    check_public_key,
    generate_private_key,
    parse_latest_handshakes,
    public_key_of,
    render_config,
)


def default_net() -> WgNetwork:
    return WgNetwork.parse("10.0.0.1/24", ["10.0.0.1/32"], "10.0.0.0/25")


def test_first_free_allocation_as_upstream_snapshots() -> None:
    net = default_net()
    assert net.alloc(set()) == "10.0.0.2"
    assert net.alloc({"10.0.0.2"}) == "10.0.0.3"
    assert net.alloc({"10.0.0.3"}) == "10.0.0.2"  # the lowest free, not the next


def test_allocation_skips_reserved_nets_and_the_gateway_and_ends() -> None:
    net = WgNetwork.parse("10.0.0.1/24", ["10.0.0.1/32", "10.0.0.0/29"], "10.0.0.0/28")
    assert net.alloc(set()) == "10.0.0.8"
    taken = {f"10.0.0.{i}" for i in range(8, 15)}
    with pytest.raises(IpPoolExhausted, match="ip pool exhausted"):
        net.alloc(taken)  # .15 is the /28's broadcast, never a host


def test_usable_addresses() -> None:
    net = default_net()
    assert net.usable("10.0.0.5")
    for bad in ("10.0.0.1", "10.0.0.200", "10.0.0.255", "10.1.0.5", "nonsense", "10.0.0.0"):
        assert not net.usable(bad), bad


@pytest.mark.parametrize(
    ("ip", "reserved", "crange", "message"),
    [
        ("10.0.0.1/24", ["10.0.1.0/32"], "10.0.0.0/25", "reserved net 10.0.1.0/32 is not in"),
        ("10.0.0.1/24", ["10.0.0.2/32"], "10.0.0.0/25", "wg peer ip 10.0.0.1 is not in the"),
        ("10.0.0.1/24", ["10.0.0.1/32"], "10.0.1.0/25", "client ip range 10.0.1.0/25 is not"),
        ("10.0.0.1", ["10.0.0.1/32"], "10.0.0.0/25", "client ip range 10.0.0.0/25 is not"),
        ("bogus", ["10.0.0.1/32"], "10.0.0.0/25", "core.wg.ip"),
        ("10.0.0.1/24", ["bogus"], "10.0.0.0/25", "core.wg.reserved_net"),
        ("10.0.0.1/24", ["10.0.0.1/32"], "bogus", "core.wg.client_ip_range"),
    ],
)
def test_network_checks(ip: str, reserved: list[str], crange: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        WgNetwork.parse(ip, reserved, crange)


def test_keys_match_the_wireguard_tools() -> None:
    private = generate_private_key()
    public = public_key_of(private)
    assert check_public_key(public) == public
    if shutil.which("wg"):
        out = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True)
        assert out.stdout.strip() == public


@pytest.mark.parametrize(
    "key",
    ["", "abc", base64.b64encode(b"x" * 31).decode(), base64.b64encode(b"x" * 33).decode(),
     "!" * 44, base64.b64encode(b"x" * 32).decode()[:-1] + "!"],
)  # fmt: skip
def test_bad_public_keys_are_refused(key: str) -> None:
    with pytest.raises(WgKeyError, match="expected base64 of 32 bytes"):
        check_public_key(key)


def test_rendered_config_has_each_peer_once_with_32_and_keepalive() -> None:
    k1, k2 = public_key_of(generate_private_key()), public_key_of(generate_private_key())
    text = render_config("PRIV", 51820, [WgPeer(k2, "10.0.0.10"), WgPeer(k1, "10.0.0.2")])
    assert text == (
        "[Interface]\nPrivateKey = PRIV\nListenPort = 51820\n\n"
        f"[Peer]\nPublicKey = {k1}\nAllowedIPs = 10.0.0.2/32\nPersistentKeepalive = 25\n\n"
        f"[Peer]\nPublicKey = {k2}\nAllowedIPs = 10.0.0.10/32\nPersistentKeepalive = 25\n"
    )
    assert "Endpoint" not in text
    assert render_config("PRIV", 1, []) == "[Interface]\nPrivateKey = PRIV\nListenPort = 1\n"


def test_latest_handshakes_parse_skips_junk() -> None:
    k1, k2 = public_key_of(generate_private_key()), public_key_of(generate_private_key())
    text = f"{k1}\t1700000000\n{k2}\t0\nnot a line\nshort\t12\n{k1[:-2]}==\tx\n"
    assert parse_latest_handshakes(text) == {k1: 1700000000.0, k2: 0.0}


def test_handshake_cache_reads_when_due_and_keeps_a_stale_value() -> None:
    now = [0.0]
    cache = HandshakeCache(refresh=10, ttl=30, clock=lambda: now[0])
    assert cache.due() and cache.current() is None and not cache.fresh()
    cache.update(None)  # the first read failed: nothing known
    assert cache.current() is None and not cache.due()
    now[0] = 10
    assert cache.due()
    cache.update({"k": 5.0})
    assert cache.current() == {"k": 5.0} and cache.fresh() and not cache.due()
    now[0] = 15
    assert not cache.due()
    now[0] = 45
    cache.update(None)  # a failed refresh keeps the last good map, now stale
    assert cache.current() == {"k": 5.0} and not cache.fresh() and cache.failures == 1
