"""prpc client: call a service over HTTP(S) or a Unix socket, in JSON or protobuf mode."""

from __future__ import annotations

import json
import os
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from cryptography import x509
from google.protobuf.message import DecodeError, Message

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


class PrpcClient:
    """`base` is `http(s)://host:port[/prefix]` or a Unix socket path (then `prefix` applies)."""

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
        self.timeout = aiohttp.ClientTimeout(total=timeout, connect=min(5.0, timeout))
        self.verify_server = verify_server
        self.peer_cert: x509.Certificate | None = None
        if base.startswith(("http://", "https://")):
            self.url = base.rstrip("/") + "/" + prefix.strip("/")
            self._connector_factory: Callable[[], aiohttp.BaseConnector] = lambda: (
                _PeerCertConnector(self._on_peer_cert, ssl=self._ssl)
            )
        else:
            self._sock = SocketPath(base)  # held open: connections are made lazily
            path = self._sock.address
            self.url = "http://localhost/" + prefix.strip("/")
            self._connector_factory = lambda: aiohttp.UnixConnector(path=path)
        self.url = self.url.rstrip("/")
        self._ssl: ssl.SSLContext | bool = True
        if base.startswith("https://"):
            self._ssl = client_ssl_context(
                ca_pem=ca_pem,
                attested=verify_server is not None,
                client_cert_pem=client_cert_pem,
                client_key_pem=client_key_pem,
            )
        self._session: aiohttp.ClientSession | None = None

    def _on_peer_cert(self, der: bytes | None) -> None:
        self.peer_cert = x509.load_der_x509_certificate(der) if der else None
        if self.verify_server is not None:
            if self.peer_cert is None:
                raise RpcError("server presented no certificate")
            self.verify_server(self.peer_cert)

    async def __aenter__(self) -> PrpcClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=self._connector_factory(), timeout=self.timeout
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(self, method: str, request: Message, response_type: type[M]) -> M:
        url = f"{self.url}/{method}"
        if self.json_mode:
            data = message_to_json(request)
            headers = {"Content-Type": "application/json"}
            url += "?json"
        else:
            data = request.SerializeToString()
            headers = {"Content-Type": "application/octet-stream"}
        async with self._sess().post(url, data=data, headers=headers) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RpcError(_error_message(body, resp.status, self.json_mode))
        out = response_type()
        try:
            if self.json_mode:
                json_to_message(body, out)
            else:
                out.ParseFromString(body)
        except (CodecError, DecodeError) as e:
            raise RpcError(f"invalid response from {method}: {e}") from e
        return out


class _PeerCertConnector(aiohttp.TCPConnector):
    """hands each new TLS connection's server certificate to a check before it is used."""

    def __init__(self, on_cert: Callable[[bytes | None], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._on_cert = on_cert

    async def _wrap_create_connection(self, *args: Any, **kwargs: Any) -> Any:
        transport, protocol = await super()._wrap_create_connection(*args, **kwargs)
        ssl_obj = transport.get_extra_info("ssl_object")
        if ssl_obj is not None:
            try:
                self._on_cert(ssl_obj.getpeercert(binary_form=True))
            except BaseException:
                transport.close()
                raise
        return transport, protocol


def _error_message(body: bytes, status: int, json_mode: bool) -> str:
    if json_mode:
        try:
            obj = json.loads(body)
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
