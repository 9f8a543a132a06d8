"""the gateway's WireGuard facts without I/O (§3.1): the network and its checks, first-free client
address allocation, key validation and generation, the rendered ``wg.conf``, the parsed
``wg show <if> latest-handshakes`` and the handshake cache.

:class:`WgNetwork` holds ``core.wg.ip`` (the gateway's address with its prefix),
``reserved_net`` and ``client_ip_range``; :meth:`WgNetwork.parse` refuses (ConfigError) a reserved
net outside the network, a gateway address outside every reserved net and a client range outside
the network, as upstream does. :meth:`WgNetwork.alloc` walks ``client_ip_range``'s hosts in
ascending order and takes the first that is not the network's broadcast, not the gateway's own
address, not inside a reserved net and not allocated (:class:`IpPoolExhausted` when none is
left). Keys are base64 of 32 bytes (Curve25519, what ``wg genkey``/``wg pubkey`` make);
:func:`check_public_key` raises :class:`WgKeyError` for anything else.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from pydstack.crypto.wgkeys import (
    WgKeyError,
    check_public_key,
    generate_private_key,
    public_key_of,
)
from pydstack.errors import ConfigError, DstackError

#: the keepalive every peer gets (seconds), as upstream's template
PERSISTENT_KEEPALIVE = 25
#: the most peers ``wg show`` output is read for (a bound on what is parsed)
MAX_HANDSHAKE_LINES = 1 << 20

__all__ = ["WgKeyError", "check_public_key", "generate_private_key", "public_key_of"]


class IpPoolExhausted(DstackError):
    """no free address is left in ``client_ip_range``."""


@dataclass(frozen=True)
class WgNetwork:
    """``core.wg.ip``, ``reserved_net`` and ``client_ip_range``, checked."""

    ip: ipaddress.IPv4Interface
    reserved: tuple[ipaddress.IPv4Network, ...]
    client_range: ipaddress.IPv4Network

    @classmethod
    def parse(cls, ip: str, reserved: Sequence[str], client_range: str) -> WgNetwork:
        """ConfigError naming the key for a malformed value or a failed §3.1 check."""
        try:
            iface = ipaddress.IPv4Interface(ip)
        except ValueError as e:
            raise ConfigError(f"core.wg.ip {ip!r} is not an ipv4 address with a prefix") from e
        try:
            nets = tuple(ipaddress.IPv4Network(n, strict=False) for n in reserved)
        except ValueError as e:
            raise ConfigError(f"core.wg.reserved_net: {e}") from e
        try:
            crange = ipaddress.IPv4Network(client_range, strict=False)
        except ValueError as e:
            raise ConfigError(f"core.wg.client_ip_range: {e}") from e
        network = iface.network
        for net in nets:
            if not net.subnet_of(network):
                raise ConfigError(f"reserved net {net} is not in the network {network}")
        if not any(iface.ip in net for net in nets):
            raise ConfigError(f"wg peer ip {iface.ip} is not in the reserved net")
        if not crange.subnet_of(network):
            raise ConfigError(f"client ip range {crange} is not in the network {network}")
        return cls(iface, nets, crange)

    def usable(self, address: str) -> bool:
        """whether `address` may be a client's (in range, not broadcast, gateway or reserved)."""
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            return False
        return (
            ip in self.client_range
            and ip != self.ip.network.broadcast_address
            and ip != self.ip.network.network_address
            and ip != self.ip.ip
            and not any(ip in net for net in self.reserved)
        )

    def alloc(self, allocated: Collection[str]) -> str:
        """the first usable client address not in `allocated` (IpPoolExhausted when none)."""
        taken = set(allocated)
        for ip in self.client_range.hosts():
            text = str(ip)
            if text not in taken and self.usable(text):
                return text
        raise IpPoolExhausted("ip pool exhausted, no available addresses in client_ip_range")


@dataclass(frozen=True)
class WgPeer:
    public_key: str
    ip: str


def render_config(private_key: str, listen_port: int, peers: Iterable[WgPeer]) -> str:
    """the gateway's ``wg.conf`` (what ``wg syncconf`` reads): the interface, then one peer per
    instance with ``AllowedIPs = <ip>/32`` and keepalive 25, ordered by address then key. No
    peer endpoint: the CVMs initiate."""
    lines = ["[Interface]", f"PrivateKey = {private_key}", f"ListenPort = {listen_port}", ""]
    ordered = sorted(peers, key=lambda p: (ipaddress.IPv4Address(p.ip), p.public_key))
    for peer in ordered:
        lines += [
            "[Peer]",
            f"PublicKey = {peer.public_key}",
            f"AllowedIPs = {peer.ip}/32",
            f"PersistentKeepalive = {PERSISTENT_KEEPALIVE}",
            "",
        ]
    return "\n".join(lines)


def parse_latest_handshakes(text: str) -> dict[str, float]:
    """``wg show <if> latest-handshakes``: public key → unix seconds (0 = never). Lines that are
    not ``<key>\\t<seconds>`` are skipped."""
    out: dict[str, float] = {}
    for n, line in enumerate(text.splitlines()):
        if n >= MAX_HANDSHAKE_LINES:
            break
        key, _, ts = line.strip().partition("\t")
        if not ts.isdigit():
            continue
        try:
            out[check_public_key(key)] = float(int(ts))
        except WgKeyError:
            continue
    return out


class HandshakeCache:
    """``latest-handshakes`` read at most every `refresh` seconds and served for up to `ttl`
    (upstream: 10 s and 30 s). :meth:`update` records a read (None: it failed); :meth:`current`
    is the last good map, a stale one when reads fail, and None before any read succeeded.
    :meth:`due` says whether the poller should read now."""

    def __init__(
        self, refresh: float = 10.0, ttl: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.refresh = refresh
        self.ttl = ttl
        self._clock = clock
        self._value: dict[str, float] | None = None
        self._at: float | None = None
        self._tried: float | None = None
        self.failures = 0

    def due(self) -> bool:
        return self._tried is None or self._clock() - self._tried >= self.refresh

    def fresh(self) -> bool:
        return self._at is not None and self._clock() - self._at < self.ttl

    def update(self, value: Mapping[str, float] | None) -> None:
        self._tried = self._clock()
        if value is None:
            self.failures += 1
            return
        self._value = dict(value)
        self._at = self._tried
        self.failures = 0

    def current(self) -> dict[str, float] | None:
        return None if self._value is None else dict(self._value)
