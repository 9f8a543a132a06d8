"""the Admin listener (`[core.admin]`, off by default): token-authenticated maintenance.

Credentials: `Authorization: Bearer <token>` or `X-Admin-Token: <token>`; the token comes from
`core.admin.auth_token`, else `DSTACK_KMS_ADMIN_TOKEN`, else `ADMIN_API_TOKEN`. It fails closed:
an enabled listener without a token refuses to start unless `insecure_no_auth = true`.
`ClearImageCache{image_hash, config_hash}` removes `images/<hex>` and `measurements/<hex>.json`
under `core.image.cache_dir` (`"all"` clears the whole directory).
"""

from __future__ import annotations

import hmac
import os
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from google.protobuf.empty_pb2 import Empty

from pydstack.rpc.proto import kms_rpc_pb2 as pb
from pydstack.rpc.server import (
    CallContext,
    PrpcServer,
    PrpcService,
    RequestGuard,
    RpcError,
    ServerLimits,
)

ADMIN = pb.DESCRIPTOR.services_by_name["Admin"]
_HEX = re.compile(r"^[0-9a-fA-F]{1,128}$")


def admin_token(configured: str) -> str:
    return (
        configured
        or os.environ.get("DSTACK_KMS_ADMIN_TOKEN")
        or os.environ.get("ADMIN_API_TOKEN", "")
    )


class AdminService:
    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    def _clear(self, sub: str, key: str, suffix: str = "") -> None:
        base = self.cache_dir / sub
        if key == "all":
            shutil.rmtree(base, ignore_errors=True)
            return
        if not _HEX.match(key):
            raise RpcError(f"invalid {sub} key: must be hex or 'all'")
        target = base / f"{key.lower()}{suffix}"
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()

    async def ClearImageCache(self, req: pb.ClearImageCacheRequest, ctx: CallContext) -> Empty:
        if req.image_hash:
            self._clear("images", req.image_hash)
        if req.config_hash:
            self._clear("measurements", req.config_hash, ".json")
        return Empty()


def admin_server(
    token: str,
    cache_dir: Path,
    *,
    insecure_no_auth: bool = False,
    limits: ServerLimits | None = None,
    guard: RequestGuard | None = None,
) -> PrpcServer:
    if not token and not insecure_no_auth:
        raise ValueError(
            "the admin listener needs core.admin.auth_token (or DSTACK_KMS_ADMIN_TOKEN); "
            "set insecure_no_auth = true to run it without authentication"
        )
    server = PrpcServer(limits=limits, guard=guard)

    @web.middleware
    async def auth(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if token:
            given = request.headers.get("X-Admin-Token", "")
            header = request.headers.get("Authorization", "")
            if header.startswith("Bearer "):
                given = header[7:]
            if not hmac.compare_digest(given.encode(), token.encode()):
                return web.json_response(
                    {"error": "admin authentication required"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="dstack-kms admin"'},
                )
        return await handler(request)

    server.app.middlewares.append(auth)
    server.mount(PrpcService(ADMIN, AdminService(cache_dir), prefix="/prpc/", trim="Admin."))
    return server
