"""ClientHello bytes for the parser tests: real ones from OpenSSL and hand-built ones."""

from __future__ import annotations

import contextlib
import ssl


def openssl_hello(sni: str | None, alpn: list[str] | None = None, tls12: bool = False) -> bytes:
    """the first flight of a real OpenSSL client (a ClientHello record); `tls12` caps it at
    TLS 1.2."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=False, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def ext(etype: int, body: bytes) -> bytes:
    return etype.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body


def sni_ext(*names: tuple[int, bytes]) -> bytes:
    entries = b"".join(t.to_bytes(1, "big") + len(n).to_bytes(2, "big") + n for t, n in names)
    return ext(0, len(entries).to_bytes(2, "big") + entries)


def alpn_ext(*protos: bytes) -> bytes:
    body = b"".join(len(p).to_bytes(1, "big") + p for p in protos)
    return ext(16, len(body).to_bytes(2, "big") + body)


def hello_body(
    extensions: bytes | None,
    *,
    session: bytes = b"",
    ciphers: bytes = b"\x13\x01",
    compression: bytes = b"\x00",
) -> bytes:
    body = b"\x03\x03" + b"\x11" * 32
    body += len(session).to_bytes(1, "big") + session
    body += len(ciphers).to_bytes(2, "big") + ciphers
    body += len(compression).to_bytes(1, "big") + compression
    if extensions is not None:
        body += len(extensions).to_bytes(2, "big") + extensions
    return body


def handshake(body: bytes, htype: int = 1) -> bytes:
    return htype.to_bytes(1, "big") + len(body).to_bytes(3, "big") + body


def records(msg: bytes, *, split: int | None = None, ctype: int = 22) -> bytes:
    """the handshake message in one TLS record, or in two split at `split`."""
    parts = [msg] if split is None else [msg[:split], msg[split:]]
    return b"".join(
        ctype.to_bytes(1, "big") + b"\x03\x01" + len(p).to_bytes(2, "big") + p for p in parts
    )


def built(extensions: bytes | None, **kw: bytes) -> bytes:
    return records(handshake(hello_body(extensions, **kw)))
