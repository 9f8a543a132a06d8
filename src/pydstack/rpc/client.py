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

from .json_codec import CodecError, json_to_message, message_to_json
from .proto import prpc_pb2
from .server import RpcError
from .unixpath import SocketPath

M = TypeVar("M", bound=Message)


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
            ctx = ssl.create_default_context()
            if ca_pem:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.load_verify_locations(cadata=ca_pem)
                ctx.check_hostname = False
            if verify_server is not None and not ca_pem:
                # trust comes from the server certificate's attestation, checked after connect
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if client_cert_pem and client_key_pem:
                with tempfile.TemporaryDirectory() as d:
                    cf, kf = Path(d) / "c.pem", Path(d) / "k.pem"
                    cf.write_text(client_cert_pem)
                    fd = os.open(kf, os.O_WRONLY | os.O_CREAT, 0o600)
                    with os.fdopen(fd, "w") as f:
                        f.write(client_key_pem)
                    ctx.load_cert_chain(cf, kf)
            self._ssl = ctx
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
