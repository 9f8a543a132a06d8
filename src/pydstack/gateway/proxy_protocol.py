"""sans-I/O PROXY protocol (HAProxy's, versions 1 and 2): parse an inbound header, build a v2 one.

:func:`parse_proxy_header` takes the bytes read so far and returns ``None`` (a valid prefix, read
more), or the header and how many bytes it used, or raises :class:`ProxyProtocolError` (an
:class:`~pydstack.errors.InputError`): no header, a malformed one, a v1 line longer than 107
bytes or with control characters, or a v2 header longer than 2048 bytes (upstream's bounds).
The answer for a prefix of a stream agrees with the answer for the whole: ``None`` or the same
header (a fuzz target checks it). Linear in the bytes looked at, at most 2048.

:func:`encode_v2` builds the v2 ``PROXY``/``STREAM`` header the gateway sends to a backend whose
port policy asks for it: TCP over IPv4 or IPv6 when both addresses are of that family (IPv4-mapped
IPv6 counts as IPv4), ``UNSPEC`` otherwise.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pydstack.errors import InputError
from pydstack.types.netaddr import parse_port

V1_PREFIX = b"PROXY "
V1_MAX = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX = 2048

_V2_CMD_LOCAL = 0x0
_V2_CMD_PROXY = 0x1
_FAM_UNSPEC = 0x00
_FAM_TCP4 = 0x11
_FAM_TCP6 = 0x21
_ADDR_LEN = {0x1: 12, 0x2: 36, 0x3: 216}

Address = tuple[str, int]


class ProxyProtocolError(InputError):
    """the stream does not start with a valid PROXY protocol header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """a parsed header: the client's and the proxy's addresses when they are TCP over IP, the
    header's own bytes (`raw`) and its version."""

    version: int
    src: Address | None
    dst: Address | None
    raw: bytes

    def to_v2(self) -> bytes:
        """the header to send on: the v2 bytes as read, or a v1 header re-encoded as v2."""
        if self.version == 2:
            return self.raw
        return encode_v2(self.src, self.dst)


def parse_proxy_header(buf: bytes | bytearray | memoryview) -> tuple[ProxyHeader, int] | None:
    """the header at the start of `buf` and its length, or None to read more."""
    data = bytes(buf[:V2_MAX])
    n = len(data)
    if n == 0:
        return None
    if data[0] == V1_PREFIX[0]:
        if data[: len(V1_PREFIX)] != V1_PREFIX[:n]:
            raise ProxyProtocolError("no proxy protocol header")
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        if data[: len(V2_SIGNATURE)] != V2_SIGNATURE[:n]:
            raise ProxyProtocolError("no proxy protocol header")
        return _parse_v2(data)
    raise ProxyProtocolError("no proxy protocol header")


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX]:
            raise ProxyProtocolError("proxy v1 header without its terminator")
        return None
    line = data[:end]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError as e:
        raise ProxyProtocolError("proxy v1 header is not ascii") from e
    if not text.isprintable():  # a lone CR or LF too: read in pieces, it is refused at once
        raise ProxyProtocolError("proxy v1 header with control characters")
    fields = text.split(" ")
    raw = data[: end + 2]
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(1, None, None, raw), end + 2
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError("malformed proxy v1 header")
    version = 4 if fields[1] == "TCP4" else 6
    src_ip = _v1_ip(fields[2], version)
    dst_ip = _v1_ip(fields[3], version)
    src_port, dst_port = _v1_port(fields[4]), _v1_port(fields[5])
    return ProxyHeader(1, (src_ip, src_port), (dst_ip, dst_port), raw), end + 2


def _v1_ip(text: str, version: int) -> str:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError as e:
        raise ProxyProtocolError("bad address in proxy v1 header") from e
    if ip.version != version:
        raise ProxyProtocolError("address family mismatch in proxy v1 header")
    return str(ip)


def _v1_port(text: str) -> int:
    port = parse_port(text, allow_zero=True)
    if port is None:
        raise ProxyProtocolError("bad port in proxy v1 header")
    return port


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    if len(data) < 16:
        return None
    ver_cmd, fam = data[12], data[13]
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError("unsupported proxy protocol version")
    cmd = ver_cmd & 0x0F
    if cmd not in (_V2_CMD_LOCAL, _V2_CMD_PROXY):
        raise ProxyProtocolError("unsupported proxy v2 command")
    length = int.from_bytes(data[14:16], "big")
    total = 16 + length
    if total > V2_MAX:
        raise ProxyProtocolError(f"proxy v2 header longer than {V2_MAX} bytes")
    if len(data) < total:
        return None
    raw = data[:total]
    family, proto = fam >> 4, fam & 0x0F
    if family > 3 or proto > 2:
        raise ProxyProtocolError("unsupported proxy v2 address family")
    need = _ADDR_LEN.get(family, 0)
    if length < need:
        raise ProxyProtocolError("proxy v2 address block truncated")
    src: Address | None = None
    dst: Address | None = None
    if cmd == _V2_CMD_PROXY and proto == 1 and family in (1, 2):
        body = data[16:]
        alen = 4 if family == 1 else 16
        src_ip = ipaddress.ip_address(body[:alen])
        dst_ip = ipaddress.ip_address(body[alen : 2 * alen])
        ports = body[2 * alen : 2 * alen + 4]
        src = (str(src_ip), int.from_bytes(ports[:2], "big"))
        dst = (str(dst_ip), int.from_bytes(ports[2:], "big"))
    return ProxyHeader(2, src, dst, raw), total


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def encode_v2(src: Address | None, dst: Address | None) -> bytes:
    """a v2 PROXY/STREAM header for a TCP connection from `src` to `dst` (UNSPEC when either is
    missing, not an IP address, or the two are of different families). ValueError for a port
    outside 0..65535."""
    head = V2_SIGNATURE + bytes([0x20 | _V2_CMD_PROXY])
    s = _ip(src[0]) if src else None
    d = _ip(dst[0]) if dst else None
    if src is None or dst is None or s is None or d is None or s.version != d.version:
        return head + bytes([_FAM_UNSPEC]) + b"\x00\x00"
    for port in (src[1], dst[1]):
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} out of range")
    ports = src[1].to_bytes(2, "big") + dst[1].to_bytes(2, "big")
    body = s.packed + d.packed + ports
    fam = _FAM_TCP4 if s.version == 4 else _FAM_TCP6
    return head + bytes([fam]) + len(body).to_bytes(2, "big") + body
