"""sans-I/O TLS ClientHello parser: the server name (SNI) and the ALPN list, from the first bytes a
client sends.

:func:`parse_client_hello` takes the bytes read so far and answers one of three things:

* ``None``: the bytes are a valid prefix of a ClientHello, read more (never returned once
  :data:`MAX_CLIENT_HELLO` bytes are buffered: a longer hello is refused);
* a :class:`ClientHello` with the first ``host_name`` of the ``server_name`` extension,
  lower-cased, and the ALPN protocol names in the client's order;
* :class:`ClientHelloError` (an :class:`~pydstack.errors.InputError`), with two subclasses the
  relay can tell apart: :class:`NotClientHelloError` (not a TLS handshake record, not a
  ClientHello, malformed or over the bound) and :class:`NoSniError` (a well-formed ClientHello
  without a host name).

The handshake message may span several TLS records (all within the bound). Every length field is
checked against what encloses it before it is used; nothing is allocated beyond the input.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydstack.errors import InputError

#: the most bytes of records read while looking for the ClientHello (upstream's sniff buffer)
MAX_CLIENT_HELLO = 4096

_RECORD_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_NAME_TYPE_HOST = 0
_MAX_RECORD = 1 << 14
_MAX_HOST = 253
#: the bytes a host name may hold (letters, digits, ``-``, ``.``, ``_``)
_HOST_CHARS = b"-._0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class ClientHelloError(InputError):
    """the bytes are not a usable TLS ClientHello."""


class NotClientHelloError(ClientHelloError):
    """not a TLS handshake record carrying a well-formed ClientHello within the bound."""


class NoSniError(ClientHelloError):
    """a well-formed ClientHello without a server name."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    """what routing needs from a ClientHello: the host name and the offered ALPN protocols."""

    sni: str
    alpn: tuple[str, ...]


def _handshake_bytes(buf: bytes) -> bytes | None:
    """the ClientHello handshake message (header included) reassembled from the records in `buf`,
    or None when more records are needed."""
    pos = 0
    msg = bytearray()
    need: int | None = None
    while True:
        have = len(buf) - pos
        if have >= 1 and buf[pos] != _RECORD_HANDSHAKE:
            raise NotClientHelloError("not a tls handshake record")
        if have >= 2 and buf[pos + 1] != 3:
            raise NotClientHelloError("not a tls record (bad version)")
        if have < 5:
            _need_more(buf)
            return None
        rlen = int.from_bytes(buf[pos + 3 : pos + 5], "big")
        if rlen == 0 or rlen > _MAX_RECORD:
            raise NotClientHelloError("bad tls record length")
        if pos + 5 + rlen > MAX_CLIENT_HELLO:
            raise NotClientHelloError(f"client hello larger than {MAX_CLIENT_HELLO} bytes")
        end = pos + 5 + rlen
        if len(buf) < end:
            # a partial record: read on only if its handshake header is already sane
            msg += buf[pos + 5 :]
            _check_header(msg)
            _need_more(buf)
            return None
        msg += buf[pos + 5 : end]
        pos = end
        need = _check_header(msg)
        if need is not None and len(msg) >= need:
            if len(msg) > need:
                raise NotClientHelloError("trailing bytes after the client hello")
            return bytes(msg)


def _check_header(msg: bytearray) -> int | None:
    """the total length of the handshake message once its header is known (validated)."""
    if not msg:
        return None
    if msg[0] != _HANDSHAKE_CLIENT_HELLO:
        raise NotClientHelloError("not a client hello")
    if len(msg) < 4:
        return None
    total = 4 + int.from_bytes(msg[1:4], "big")
    if total > MAX_CLIENT_HELLO:
        raise NotClientHelloError(f"client hello larger than {MAX_CLIENT_HELLO} bytes")
    return total


def _need_more(buf: bytes) -> None:
    """refuse to read on once the bound is reached."""
    if len(buf) >= MAX_CLIENT_HELLO:
        raise NotClientHelloError(f"client hello larger than {MAX_CLIENT_HELLO} bytes")


def _u16(d: bytes, i: int, end: int, what: str) -> int:
    if i + 2 > end:
        raise NotClientHelloError(f"client hello truncated in {what}")
    return (d[i] << 8) | d[i + 1]


def _vec(d: bytes, i: int, end: int, len_bytes: int, what: str) -> tuple[int, int]:
    """(start, end) of the vector whose length prefix is at `i`, within `end`."""
    if len_bytes == 1:
        if i + 1 > end:
            raise NotClientHelloError(f"client hello truncated in {what}")
        n, start = d[i], i + 1
    else:
        n, start = _u16(d, i, end, what), i + 2
    if start + n > end:
        raise NotClientHelloError(f"client hello truncated in {what}")
    return start, start + n


def parse_client_hello(buf: bytes | bytearray | memoryview) -> ClientHello | None:
    """the SNI and ALPN of the ClientHello at the start of `buf`, or None to read more.

    Raises :class:`NotClientHelloError` or :class:`NoSniError` (see the module doc)."""
    n = len(buf)
    if (
        9 <= n <= MAX_CLIENT_HELLO
        and buf[0] == _RECORD_HANDSHAKE
        and buf[1] == 3
        and buf[5] == _HANDSHAKE_CLIENT_HELLO
        and ((buf[3] << 8) | buf[4]) + 5 == n
        and ((buf[6] << 16) | (buf[7] << 8) | buf[8]) + 9 == n
    ):
        # the usual case: one record holding exactly the whole ClientHello, which
        # _handshake_bytes would reassemble into the same bytes
        d = bytes(buf[5:])
    else:
        data = bytes(buf[:MAX_CLIENT_HELLO]) if n > MAX_CLIENT_HELLO else bytes(buf)
        reassembled = _handshake_bytes(data)
        if reassembled is None:
            return None
        d = reassembled
    return _parse_hello(d)


def _parse_hello(d: bytes) -> ClientHello:
    """the SNI and ALPN of one whole ClientHello handshake message (header included)."""
    end = len(d)
    i = 4 + 2 + 32
    if i > end:
        raise NotClientHelloError("client hello truncated in version and random")
    s0, i = _vec(d, i, end, 1, "session id")
    if i - s0 > 32:
        raise NotClientHelloError("session id longer than 32 bytes")
    c0, i = _vec(d, i, end, 2, "cipher suites")
    if i == c0 or (i - c0) % 2:
        raise NotClientHelloError("bad cipher suites length")
    m0, i = _vec(d, i, end, 1, "compression methods")
    if i == m0:
        raise NotClientHelloError("no compression methods")
    if i == end:
        raise NoSniError("no sni found")
    i, ext_end = _vec(d, i, end, 2, "extensions")
    if ext_end != end:
        raise NotClientHelloError("trailing bytes after the extensions")
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    seen: set[int] = set()
    while i < ext_end:
        # inlined _u16/_vec: this loop runs for every extension of every new connection
        if i + 2 > ext_end:
            raise NotClientHelloError("client hello truncated in extension type")
        if i + 4 > ext_end:
            raise NotClientHelloError("client hello truncated in extension body")
        etype = (d[i] << 8) | d[i + 1]
        b0 = i + 4
        i = b0 + ((d[i + 2] << 8) | d[i + 3])
        if i > ext_end:
            raise NotClientHelloError("client hello truncated in extension body")
        if etype in seen:
            raise NotClientHelloError(f"duplicate extension {etype}")
        seen.add(etype)
        if etype == _EXT_SERVER_NAME:
            sni = _server_name(d, b0, i)
        elif etype == _EXT_ALPN:
            alpn = _alpn(d, b0, i)
    if sni is None:
        raise NoSniError("no sni found")
    return ClientHello(sni=sni, alpn=alpn)


def _server_name(d: bytes, i: int, end: int) -> str | None:
    i, list_end = _vec(d, i, end, 2, "server name list")
    if list_end != end:
        raise NotClientHelloError("trailing bytes in the server name extension")
    found: str | None = None
    while i < list_end:
        ntype = d[i]
        n0, i = _vec(d, i + 1, list_end, 2, "server name")
        if ntype == _NAME_TYPE_HOST and found is None:
            found = _host(d[n0:i])
    return found


def _host(raw: bytes) -> str:
    if not raw or len(raw) > _MAX_HOST:
        raise NotClientHelloError("bad sni length")
    if raw.endswith(b"."):
        raw = raw[:-1]
    if raw.translate(None, _HOST_CHARS):
        raise NotClientHelloError("sni is not a host name")
    if not raw or b".." in raw or raw.startswith(b"."):
        raise NotClientHelloError("sni is not a host name")
    return raw.decode("ascii").lower()


def _alpn(d: bytes, i: int, end: int) -> tuple[str, ...]:
    i, list_end = _vec(d, i, end, 2, "alpn list")
    if list_end != end:
        raise NotClientHelloError("trailing bytes in the alpn extension")
    out: list[str] = []
    while i < list_end:
        p0, i = _vec(d, i, list_end, 1, "alpn protocol")
        if i == p0:
            raise NotClientHelloError("empty alpn protocol")
        out.append(d[p0:i].decode("latin-1"))
    return tuple(out)
