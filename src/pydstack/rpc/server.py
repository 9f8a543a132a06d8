"""prpc server: protobuf services over HTTP on aiohttp, as upstream's ra-rpc mounts them.

Each rpc answers `POST|GET <prefix><Method>` (a trim prefix such as "Tappd." is accepted too).
JSON mode when the request is a GET, carries `?json` (empty, "1" or "true"), or has a JSON
content type; protobuf otherwise. Any error is HTTP 400: `{"error": msg}` (pretty-printed) in
JSON mode, `ProtoError` in protobuf mode; an unknown method is `Service not found: <method>`.
Responses always carry Content-Length. Listeners: TCP, Unix sockets (mode set, stale socket
removed) and TLS with optional or required client certificates; handlers receive a
:class:`CallContext` with the peer certificate and the Unix peer credentials.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from .json_codec import CodecError, json_to_message, message_to_json, query_to_message
from .proto import prpc_pb2
from .unixpath import SocketPath

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 10 * 1024 * 1024
JSON_CT = "application/json"
PROTO_CT = "application/octet-stream"


class RpcError(Exception):
    """an expected failure: the caller sees exactly this message."""


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class CallContext:
    peer_cert: x509.Certificate | None
    peer_cred: PeerCred | None
    remote: str | None
    request: web.Request | None = None


Handler = Callable[[Any, CallContext], Awaitable[Message]]


@dataclass
class PrpcService:
    """a protobuf service bound to an implementation object with one async method per rpc."""

    descriptor: ServiceDescriptor
    impl: object
    prefix: str = "/"
    trim: str = ""
    #: per method, response fields left out of JSON when empty (upstream's skip_serializing_if)
    omit_empty: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def method(self, name: str) -> tuple[Handler, type[Message], type[Message]] | None:
        if self.trim and name.startswith(self.trim):
            name = name[len(self.trim) :]
        m = self.descriptor.methods_by_name.get(name)
        fn = getattr(self.impl, name, None) if m is not None else None
        if m is None or fn is None:
            return None
        return fn, GetMessageClass(m.input_type), GetMessageClass(m.output_type)


def _is_json(request: web.Request) -> bool:
    if request.method == "GET":
        return True
    if request.query.get("json", None) in ("", "1", "true"):
        return True
    return request.content_type in (JSON_CT, "text/json") or request.content_type.endswith("+json")


def _error(message: str, json_mode: bool) -> web.Response:
    if json_mode:
        body = json.dumps({"error": message}, indent=2).encode()
        return web.Response(status=400, body=body, content_type=JSON_CT)
    return web.Response(
        status=400,
        body=prpc_pb2.ProtoError(message=message).SerializeToString(),
        content_type=PROTO_CT,
    )


def peer_context(request: web.Request) -> CallContext:
    transport = request.transport
    cert = None
    cred = None
    if transport is not None:
        ssl_obj = transport.get_extra_info("ssl_object")
        if ssl_obj is not None:
            der = ssl_obj.getpeercert(binary_form=True)
            if der:
                cert = x509.load_der_x509_certificate(der)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            try:
                raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                pid, uid, gid = struct.unpack("3i", raw)
                cred = PeerCred(pid, uid, gid)
            except OSError:
                cred = None
    return CallContext(cert, cred, request.remote, request)


class PrpcServer:
    """an aiohttp application serving prpc services on any number of listeners."""

    def __init__(
        self,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        response_headers: Mapping[str, str] | None = None,
    ) -> None:
        self.max_body = max_body
        self.response_headers = dict(response_headers or {})
        self.app = web.Application(client_max_size=max_body)
        self.app.on_response_prepare.append(self._add_headers)
        self._runner: web.AppRunner | None = None
        self._sites: list[web.BaseSite] = []

    async def _add_headers(self, _: web.Request, response: web.StreamResponse) -> None:
        for k, v in self.response_headers.items():
            response.headers[k] = v

    def mount(self, service: PrpcService) -> None:
        async def handle(request: web.Request) -> web.Response:
            return await self._dispatch(service, request)

        path = service.prefix.rstrip("/") + "/{method}"
        self.app.router.add_route("GET", path, handle)
        self.app.router.add_route("POST", path, handle)

    async def _dispatch(self, service: PrpcService, request: web.Request) -> web.Response:
        name = request.match_info["method"]
        json_mode = _is_json(request)
        found = service.method(name)
        if found is None:
            return _error(f"Service not found: {name}", json_mode)
        fn, req_cls, _ = found
        try:
            body = await request.read() if request.method == "POST" else b""
        except web.HTTPRequestEntityTooLarge:
            return _error(f"request body too large (max {self.max_body} bytes)", json_mode)
        try:
            req = req_cls()
            if request.method == "GET":
                query_to_message(request.query_string, req)
            elif json_mode:
                json_to_message(body, req)
            else:
                req.ParseFromString(body)
        except (CodecError, DecodeError) as e:
            return _error(f"failed to decode request: {e}", json_mode)
        try:
            resp = await fn(req, peer_context(request))
        except RpcError as e:
            return _error(str(e), json_mode)
        except Exception as e:  # a handler bug must not take the server down
            log.exception("rpc %s failed", name)
            return _error(str(e) or type(e).__name__, json_mode)
        if json_mode:
            omit = service.omit_empty.get(name.removeprefix(service.trim), frozenset())
            return web.Response(body=message_to_json(resp, omit), content_type=JSON_CT)
        return web.Response(body=resp.SerializeToString(), content_type=PROTO_CT)

    # ------------------------------------------------------------------ listeners
    async def _runner_ready(self) -> web.AppRunner:
        if self._runner is None:
            self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
            await self._runner.setup()
        return self._runner

    async def listen_tcp(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None = None
    ) -> int:
        runner = await self._runner_ready()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True)
        await site.start()
        self._sites.append(site)
        server = site._server  # the bound port of port 0
        socks = getattr(server, "sockets", None) or []
        return int(socks[0].getsockname()[1]) if socks else port

    async def listen_unix(self, path: str | Path, mode: int = 0o777) -> None:
        path = Path(path)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise RuntimeError(f"refusing to replace non-socket file {path}")
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        runner = await self._runner_ready()
        with SocketPath(path) as addr:
            site = web.UnixSite(runner, addr.address)
            await site.start()
        os.chmod(path, mode)
        self._sites.append(site)

    async def listen_tls(
        self,
        host: str,
        port: int,
        *,
        cert_pem: str,
        key_pem: str,
        client_ca_pem: str | None = None,
        require_client_cert: bool = False,
    ) -> int:
        return await self.listen_tcp(
            host, port, server_ssl_context(cert_pem, key_pem, client_ca_pem, require_client_cert)
        )

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._sites = []


def server_ssl_context(
    cert_pem: str,
    key_pem: str,
    client_ca_pem: str | None = None,
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    import tempfile

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory() as d:
        cert_file = Path(d) / "cert.pem"
        key_file = Path(d) / "key.pem"
        cert_file.write_text(cert_pem)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key_pem)
        ctx.load_cert_chain(cert_file, key_file)
    if client_ca_pem:
        ctx.load_verify_locations(cadata=client_ca_pem)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    elif require_client_cert:
        raise ValueError("requiring client certificates needs a client ca")
    return ctx
