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


class _Reader:
    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def take(self, n: int, what: str) -> int:
        """advance by n bytes; the start offset."""
        start = self.pos
        if n > self.end - start:
            raise NotClientHelloError(f"client hello truncated in {what}")
        self.pos = start + n
        return start

    def uint(self, n: int, what: str) -> int:
        start = self.take(n, what)
        return int.from_bytes(self.data[start : start + n], "big")

    def vector(self, len_bytes: int, what: str) -> _Reader:
        n = self.uint(len_bytes, what)
        start = self.take(n, what)
        return _Reader(self.data, start, start + n)

    def done(self) -> bool:
        return self.pos >= self.end


def parse_client_hello(buf: bytes | bytearray | memoryview) -> ClientHello | None:
    """the SNI and ALPN of the ClientHello at the start of `buf`, or None to read more.

    Raises :class:`NotClientHelloError` or :class:`NoSniError` (see the module doc)."""
    data = bytes(buf[:MAX_CLIENT_HELLO]) if len(buf) > MAX_CLIENT_HELLO else bytes(buf)
    msg = _handshake_bytes(data)
    if msg is None:
        return None
    r = _Reader(msg, 4)
    r.take(2 + 32, "version and random")
    session = r.vector(1, "session id")
    if session.end - session.pos > 32:
        raise NotClientHelloError("session id longer than 32 bytes")
    ciphers = r.vector(2, "cipher suites")
    n_ciphers = ciphers.end - ciphers.pos
    if n_ciphers == 0 or n_ciphers % 2:
        raise NotClientHelloError("bad cipher suites length")
    if r.vector(1, "compression methods").done():
        raise NotClientHelloError("no compression methods")
    if r.done():
        raise NoSniError("no sni found")
    exts = r.vector(2, "extensions")
    if not r.done():
        raise NotClientHelloError("trailing bytes after the extensions")
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    seen: set[int] = set()
    while not exts.done():
        etype = exts.uint(2, "extension type")
        body = exts.vector(2, "extension body")
        if etype in seen:
            raise NotClientHelloError(f"duplicate extension {etype}")
        seen.add(etype)
        if etype == _EXT_SERVER_NAME:
            sni = _server_name(body)
        elif etype == _EXT_ALPN:
            alpn = _alpn(body)
    if sni is None:
        raise NoSniError("no sni found")
    return ClientHello(sni=sni, alpn=alpn)


def _server_name(body: _Reader) -> str | None:
    names = body.vector(2, "server name list")
    if not body.done():
        raise NotClientHelloError("trailing bytes in the server name extension")
    found: str | None = None
    while not names.done():
        ntype = names.uint(1, "server name type")
        name = names.vector(2, "server name")
        if ntype == _NAME_TYPE_HOST and found is None:
            found = _host(name.data[name.pos : name.end])
    return found


def _host(raw: bytes) -> str:
    if not raw or len(raw) > _MAX_HOST:
        raise NotClientHelloError("bad sni length")
    if raw.endswith(b"."):
        raw = raw[:-1]
    for c in raw:
        if not (0x30 <= c <= 0x39 or 0x61 <= c <= 0x7A or 0x41 <= c <= 0x5A or c in b"-._"):
            raise NotClientHelloError("sni is not a host name")
    if not raw or b".." in raw or raw.startswith(b"."):
        raise NotClientHelloError("sni is not a host name")
    return raw.decode("ascii").lower()


def _alpn(body: _Reader) -> tuple[str, ...]:
    protos = body.vector(2, "alpn list")
    if not body.done():
        raise NotClientHelloError("trailing bytes in the alpn extension")
    out: list[str] = []
    while not protos.done():
        p = protos.vector(1, "alpn protocol")
        if p.end == p.pos:
            raise NotClientHelloError("empty alpn protocol")
        out.append(p.data[p.pos : p.end].decode("latin-1"))
    return tuple(out)
