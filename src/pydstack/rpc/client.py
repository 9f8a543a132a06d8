"""prpc client: call a service over HTTP(S) or a Unix socket, in JSON or protobuf mode."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import tempfile
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from google.protobuf.message import DecodeError, Message

from pydstack.crypto.certload import load_cert_der
from pydstack.types import jsonlimits
from pydstack.types.capped import read_capped_stream

from .errors import RpcError
from .json_codec import CodecError, json_to_message, message_to_json
from .proto import prpc_pb2
from .unixpath import SocketPath

M = TypeVar("M", bound=Message)


_SYSTEM_TRUST: ssl.SSLContext | None = None


def client_ssl_context(
    *,
    ca_pem: str | None = None,
    attested: bool = False,
    client_cert_pem: str | None = None,
    client_key_pem: str | None = None,
) -> ssl.SSLContext:
    """the TLS context of a client: the system's roots only when they decide (loading them costs
    ~50 ms, so that context is built once and shared); `ca_pem` alone when given; no chain
    verification when trust comes from the server's attestation (`attested`: the certificate is
    checked after connecting). A client certificate makes a context of its own."""
    global _SYSTEM_TRUST
    if not ca_pem and not attested and not client_cert_pem:
        if _SYSTEM_TRUST is None:
            _SYSTEM_TRUST = ssl.create_default_context()
        return _SYSTEM_TRUST
    if not ca_pem and not attested:
        ctx = ssl.create_default_context()
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False
        if ca_pem:
            ctx.load_verify_locations(cadata=ca_pem)
        else:
            ctx.verify_mode = ssl.CERT_NONE
    if client_cert_pem and client_key_pem:
        _load_cert_chain(ctx, client_cert_pem, client_key_pem)
    return ctx


def _load_cert_chain(ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """ssl loads certificates from files only: hand it anonymous in-memory files (the key never
    touches a filesystem), or a private temporary directory where memfd is missing."""
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create("cert", os.MFD_CLOEXEC), os.memfd_create("key", os.MFD_CLOEXEC)]
        try:
            for fd, text in zip(fds, (cert_pem, key_pem), strict=True):
                os.write(fd, text.encode())
            ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory() as d:
        cf, kf = Path(d) / "c.pem", Path(d) / "k.pem"
        cf.write_text(cert_pem)
        fd = os.open(kf, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key_pem)
        ctx.load_cert_chain(cf, kf)


#: bounds on what a server may send back: the head of a response and its body
MAX_RESPONSE_HEAD = 64 * 1024
MAX_RESPONSE_BODY = 64 * 1024 * 1024
#: idle keep-alive connections a client holds for its next calls
MAX_IDLE = 8


class _Stale(Exception):
    """a kept-alive connection closed before any byte of the answer: the server had dropped it."""


class PrpcClient:
    """`base` is `http(s)://host:port[/prefix]` or a Unix socket path (then `prefix` applies).

    HTTP/1.1 on asyncio streams, connections kept alive between calls (a connection the server
    closed while idle is replaced once, before any byte of the answer was read). `call` raises
    RpcError for an answer that is not a result (an error status, a malformed or oversized
    response), OSError for the connection (ssl.SSLError and ConnectionError included) and
    TimeoutError past `timeout` (5 s at most of it to connect).
    """

    def __init__(
        self,
        base: str,
        *,
        prefix: str = "/",
        json_mode: bool = True,
        timeout: float = 60.0,
        client_cert_pem: str | None = None,
        client_key_pem: str | None = None,
        ca_pem: str | None = None,
        verify_server: Callable[[x509.Certificate], None] | None = None,
    ) -> None:
        self.json_mode = json_mode
        self.timeout = timeout
        self.connect_timeout = min(5.0, timeout)
        self.verify_server = verify_server
        self.peer_cert: x509.Certificate | None = None
        self._ssl: ssl.SSLContext | None = None
        self._sock: SocketPath | None = None
        if base.startswith(("http://", "https://")):
            parts = urllib.parse.urlsplit(base)
            if not parts.hostname:
                raise ValueError(f"no host in {base[:200]!r}")
            self._host = parts.hostname
            self._port = parts.port or (443 if parts.scheme == "https" else 80)
            host = f"[{self._host}]" if ":" in self._host else self._host
            default = self._port == (443 if parts.scheme == "https" else 80)
            self._host_header = host if default else f"{host}:{self._port}"
            path = parts.path
            if parts.scheme == "https":
                self._ssl = client_ssl_context(
                    ca_pem=ca_pem,
                    attested=verify_server is not None,
                    client_cert_pem=client_cert_pem,
                    client_key_pem=client_key_pem,
                )
        else:
            self._sock = SocketPath(base)  # held open: connections are made lazily
            self._host_header = "localhost"
            path = ""
        self._path = (path.rstrip("/") + "/" + prefix.strip("/")).rstrip("/")
        self.url = f"{'https' if self._ssl else 'http'}://{self._host_header}{self._path}"
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def _on_peer_cert(self, der: bytes | None) -> None:
        try:
            self.peer_cert = load_cert_der(der) if der else None
        except ValueError as e:
            raise RpcError(f"the server's certificate cannot be read: {e}") from None
        if self.verify_server is not None:
            if self.peer_cert is None:
                raise RpcError("server presented no certificate")
            self.verify_server(self.peer_cert)

    async def __aenter__(self) -> PrpcClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()
        for _, writer in idle:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with asyncio.timeout(self.connect_timeout):
            if self._sock is not None:
                return await asyncio.open_unix_connection(
                    self._sock.address, limit=MAX_RESPONSE_HEAD
                )
            reader, writer = await asyncio.open_connection(
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl else None,
                limit=MAX_RESPONSE_HEAD,
            )
        ssl_obj = writer.get_extra_info("ssl_object")
        if ssl_obj is not None:
            try:
                self._on_peer_cert(ssl_obj.getpeercert(binary_form=True))
            except BaseException:
                writer.close()
                raise
        return reader, writer

    async def call(self, method: str, request: Message, response_type: type[M]) -> M:
        path = f"{self._path}/{method}"
        if self.json_mode:
            data = message_to_json(request)
            content_type = "application/json"
            path += "?json"
        else:
            data = request.SerializeToString()
            content_type = "application/octet-stream"
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self._host_header}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
            "Accept: */*\r\nAccept-Encoding: identity\r\n\r\n"
        ).encode()
        async with asyncio.timeout(self.timeout):
            status, body = await self._roundtrip(head + data)
        if status != 200:
            raise RpcError(_error_message(body, status, self.json_mode))
        out = response_type()
        try:
            if self.json_mode:
                json_to_message(body, out)
            else:
                out.ParseFromString(body)
        except (CodecError, DecodeError) as e:
            raise RpcError(f"invalid response from {method}: {e}") from e
        return out

    async def _roundtrip(self, raw: bytes) -> tuple[int, bytes]:
        while self._idle:
            conn = self._idle.pop()
            try:
                return await self._exchange(conn, raw)
            except _Stale:
                continue
        try:
            return await self._exchange(await self._connect(), raw)
        except _Stale:
            raise ConnectionResetError(
                "the server closed a new connection without an answer"
            ) from None

    async def _exchange(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], raw: bytes
    ) -> tuple[int, bytes]:
        reader, writer = conn
        keep = False
        try:
            try:
                writer.write(raw)
                await writer.drain()
                first = await reader.readuntil(b"\r\n")
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                if isinstance(e, asyncio.IncompleteReadError) and e.partial:
                    raise RpcError("the server's answer broke off in its status line") from None
                raise _Stale from None
            status, body, keep = await _read_response(first, reader)
            return status, body
        except asyncio.IncompleteReadError:
            raise RpcError("the server's answer broke off") from None
        except asyncio.LimitOverrunError:
            raise RpcError("the server's answer has a line or head over 64 KiB") from None
        finally:
            if keep and len(self._idle) < MAX_IDLE and not reader.at_eof():
                self._idle.append(conn)
            else:
                writer.close()


async def _read_response(first: bytes, reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """status, body and whether the connection stays open, after the status line `first`."""
    parts = first.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise RpcError(f"not an HTTP/1.1 answer: {first[:80]!r}")
    status = int(parts[1])
    keep = parts[0] == b"HTTP/1.1"
    length: int | None = None
    chunked = False
    size = len(first)
    while True:
        line = await reader.readuntil(b"\r\n")
        size += len(line)
        if size > MAX_RESPONSE_HEAD:
            raise RpcError("the server's answer has a head over 64 KiB")
        if line == b"\r\n":
            break
        name, sep, value = line.partition(b":")
        if not sep:
            raise RpcError(f"malformed header line in the answer: {line[:80]!r}")
        key, value = name.strip().lower(), value.strip()
        if key == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise RpcError("the answer has an invalid Content-Length")
            length = int(value)
        elif key == b"transfer-encoding":
            chunked = value.lower().split(b",")[-1].strip() == b"chunked"
            if not chunked:
                raise RpcError(f"unsupported transfer encoding {value[:40]!r} in the answer")
        elif key == b"connection":
            tokens = {t.strip() for t in value.lower().split(b",")}
            keep = (keep or b"keep-alive" in tokens) and b"close" not in tokens
    if chunked:
        return status, await _read_chunked(reader), keep
    if length is not None:
        if length > MAX_RESPONSE_BODY:
            raise RpcError(f"the answer's body of {length} bytes is over the client's bound")
        return status, await reader.readexactly(length), keep
    if status in (204, 304) or 100 <= status < 200:
        return status, b"", keep
    body = await read_capped_stream(reader, MAX_RESPONSE_BODY)  # no length: ends with the stream
    if len(body) > MAX_RESPONSE_BODY:
        raise RpcError("the answer's body is over the client's bound")
    return status, body, False


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise RpcError(f"malformed chunk size {size_text[:20]!r} in the answer") from None
        if size < 0 or len(size_text) > 16:
            raise RpcError("malformed chunk size in the answer")
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return b"".join(chunks)
        total += size
        if total > MAX_RESPONSE_BODY:
            raise RpcError("the answer's body is over the client's bound")
        chunks.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise RpcError("malformed chunk in the answer")


def _error_message(body: bytes, status: int, json_mode: bool) -> str:
    if json_mode:
        try:
            obj = jsonlimits.loads(body)
            if isinstance(obj, dict) and isinstance(obj.get("error"), str):
                return str(obj["error"])
        except ValueError:
            pass
    else:
        try:
            return str(prpc_pb2.ProtoError.FromString(body).message)
        except DecodeError:
            pass
    return f"http {status}: {body[:200].decode('utf-8', 'replace')}"
