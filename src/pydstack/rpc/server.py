"""prpc server: protobuf services over HTTP on aiohttp, as upstream's ra-rpc mounts them.

Each rpc answers `POST <prefix><Method>` (a trim prefix such as "Tappd." is accepted too), and
`GET` for the methods its service declares read-only (`PrpcService.get_methods`; others are 405).
A POST body is JSON or protobuf by its content type and `?json` (see :mod:`.guard`); browser
"simple" content types are 415. Every request first passes the server's :class:`RequestGuard`
(Host, Origin, Sec-Fetch-Site: 403), for the plain aiohttp routes added to `app` too. A decoded
call's error is HTTP 400: `{"error": msg}` (pretty-printed) in JSON mode, `ProtoError` in protobuf
mode; an unknown method is `Service not found: <method>`. Responses always carry Content-Length.
Listeners: TCP, Unix sockets (mode and group set, stale socket removed) and TLS with optional or
required client certificates, all under one :class:`ServerLimits`; handlers receive a
:class:`CallContext` with the peer certificate and the Unix peer credentials.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from aiohttp import web

from pydstack.crypto.certload import load_cert_der

from .aiolimits import LimitedRunner, LimitedSite
from .calls import (
    CLIENT_CERT_UNREADABLE,
    DEFAULT_MAX_BODY,
    Answer,
    CallContext,
    Encoded,
    PeerCred,
    PrpcService,
    dns_names,
    error_answer,
    invoke_call,
    parse_socket_mode,
    peer_cred,
    refused_answer,
    resolve_call,
    server_ssl_context,
    unix_listener,
)
from .errors import RpcError
from .guard import RequestGuard
from .limits import ServerLimits, raise_nofile_limit

__all__ = [
    "DEFAULT_MAX_BODY",
    "CallContext",
    "Encoded",
    "PeerCred",
    "PrpcServer",
    "PrpcService",
    "RequestGuard",
    "RpcError",
    "ServerLimits",
    "dns_names",
    "parse_socket_mode",
    "peer_context",
    "peer_cred",
    "raise_nofile_limit",
    "server_ssl_context",
    "unix_listener",
]

log = logging.getLogger(__name__)


def _response(answer: Answer) -> web.Response:
    return web.Response(
        status=answer.status,
        body=answer.body,
        content_type=answer.content_type,
        headers=answer.headers,
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
                cert = load_cert_der(der)  # ValueError: answered as a refusal
        cred = peer_cred(transport.get_extra_info("socket"))
    return CallContext(cert, cred, request.remote, request)


class PrpcServer:
    """an aiohttp application serving prpc services on any number of listeners.

    `limits` bound every connection (shared by all listeners); `guard` is applied to every
    request, prpc or plain route (a TLS listener adds its certificate's DNS names to it).
    """

    def __init__(
        self,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        response_headers: Mapping[str, str] | None = None,
        limits: ServerLimits | None = None,
        guard: RequestGuard | None = None,
    ) -> None:
        self.max_body = max_body
        self.response_headers = dict(response_headers or {})
        self.limits = limits or ServerLimits()
        self.guard = guard or RequestGuard()
        self.app = web.Application(client_max_size=max_body, middlewares=[self._guard_middleware])
        self.app.on_response_prepare.append(self._add_headers)
        self._runner: LimitedRunner | None = None
        self._sites: list[LimitedSite] = []
        self._prpc_handlers: set[object] = set()

    @property
    def open_connections(self) -> int:
        """connections open now on all listeners (TLS handshakes included)."""
        return len(self._runner.connections) if self._runner is not None else 0

    @property
    def peak_connections(self) -> int:
        """the most connections that were open at once."""
        return self._runner.connections.peak if self._runner is not None else 0

    async def _add_headers(self, _: web.Request, response: web.StreamResponse) -> None:
        for k, v in self.response_headers.items():
            response.headers[k] = v

    @web.middleware
    async def _guard_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        refusal = self.guard.check(request)
        if refusal is not None:
            log.info(
                "refused %s %s from %s: %s",
                request.method,
                request.path[:100],
                request.remote,
                refusal.message,
            )
            if request.match_info.handler in self._prpc_handlers:
                return _response(refused_answer(refusal, request))
            return web.json_response({"error": refusal.message}, status=refusal.status)
        return await handler(request)

    def mount(self, service: PrpcService) -> None:
        async def handle(request: web.Request) -> web.Response:
            return await self._dispatch(service, request)

        path = service.prefix.rstrip("/") + "/{method}"
        self.app.router.add_route("GET", path, handle)
        self.app.router.add_route("POST", path, handle)
        self._prpc_handlers.add(handle)

    async def _dispatch(self, service: PrpcService, request: web.Request) -> web.Response:
        call = resolve_call(service, request.match_info["method"], request)
        if isinstance(call, Answer):
            return _response(call)
        try:
            body = await request.read() if not call.is_get else b""
        except web.HTTPRequestEntityTooLarge:
            return _response(
                error_answer(f"request body too large (max {self.max_body} bytes)", call.json_mode)
            )
        except ConnectionError:  # cut off (e.g. a body too slow): nobody to answer
            return _response(error_answer("connection lost", call.json_mode))
        try:
            peer = peer_context(request)
        except ValueError as e:
            return _response(error_answer(CLIENT_CERT_UNREADABLE.format(e), call.json_mode))
        answer = await invoke_call(service, call, body, request.query_string, peer)
        return _response(answer)

    # ------------------------------------------------------------------ listeners
    async def _runner_ready(self) -> LimitedRunner:
        if self._runner is None:
            self._runner = LimitedRunner(self.app, self.limits)
            await self._runner.setup()
        return self._runner

    async def listen_tcp(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None = None
    ) -> int:
        """listen on `host`:`port` (0 picks one); returns the bound port."""
        runner = await self._runner_ready()
        site = LimitedSite(runner, host=host, port=port, ssl_context=ssl_context)
        await site.start()
        self._sites.append(site)
        return site.port

    async def listen_unix(
        self, path: str | Path, mode: int = 0o660, group: str | int | None = None
    ) -> None:
        """listen on a Unix socket at `path` (see :func:`unix_listener`)."""
        runner = await self._runner_ready()

        async def start(address: str) -> None:
            site = LimitedSite(runner, path=address)
            await site.start()
            self._sites.append(site)

        await unix_listener(path, mode, group, start)

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
        """TLS on `host`:`port`; the certificate's DNS names become allowed Host names."""
        self.guard = self.guard.with_hosts(dns_names(cert_pem))
        return await self.listen_tcp(
            host, port, server_ssl_context(cert_pem, key_pem, client_ca_pem, require_client_cert)
        )

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self._sites = []
