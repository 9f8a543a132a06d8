"""the VMM's external server: `/prpc/<Method>` (Vmm), `/guest/<Method>`, `/logs`, the web UI.

Token auth (when `[auth] enabled`) guards every route: `Authorization: Bearer <t>`,
`X-Admin-Token: <t>`, Basic with the token as password (or as user with an empty password), or
`?token=<t>` on GET. Tokens are compared by SHA-256 digest in constant time. With `[auth]
htpasswd_file`, Basic auth also accepts that file's users (bcrypt, :mod:`pydstack.rpc.auth`).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.resources
import json
import re
import time
from html import escape
from pathlib import Path

from aiohttp import web
from google.protobuf.empty_pb2 import Empty

from pydstack import UPSTREAM_VERSION, __version__
from pydstack.rpc.auth import Htpasswd, Middleware
from pydstack.rpc.auth import auth_middleware as shared_auth_middleware
from pydstack.rpc.client import PrpcClient
from pydstack.rpc.proto import guest_api_pb2 as gpb
from pydstack.rpc.proto import vmm_rpc_pb2 as pb
from pydstack.rpc.server import CallContext, PrpcServer, PrpcService
from pydstack.types.netaddr import ascii_decimal

from .app import VmmApp
from .errors import KMS_NOT_CONFIGURED, InvalidState, KmsUnavailable, Refused
from .image_store import ImageStore
from .validate import validate_app_compose

VMM = pb.DESCRIPTOR.services_by_name["Vmm"]
PROXIED_GUEST = gpb.DESCRIPTOR.services_by_name["ProxiedGuestApi"]
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
MAX_LOG_LINES = 100_000
#: methods callable with GET (read-only); creating, changing and removing VMs is POST only.
VMM_GET_METHODS = frozenset(
    {
        "ListRegistryImages",
        "Status",
        "GetInfo",
        "ListImages",
        "GetComposeHash",
        "Version",
        "GetMeta",
        "ListGpus",
        "GetAppEnvEncryptPubKey",
        "SvList",
    }
)
PROXIED_GET_METHODS = frozenset({"Info", "SysInfo", "NetworkInfo", "ListContainers"})


class VmmService:
    def __init__(self, app: VmmApp) -> None:
        self.app = app
        self.images = ImageStore(
            app.config.image_path,
            app.config.image_registry,
            in_use=lambda: {vm.manifest.image for vm in app.vms.values()},
            builtin=app.backend.capabilities.builtin_images,
        )

    async def CreateVm(self, req: pb.VmConfiguration, ctx: CallContext) -> pb.Id:
        return pb.Id(id=await self.app.create_vm(req))

    async def StartVm(self, req: pb.Id, ctx: CallContext) -> Empty:
        await self.app.start_vm(req.id)
        return Empty()

    async def StopVm(self, req: pb.Id, ctx: CallContext) -> Empty:
        await self.app.stop_vm(req.id)
        return Empty()

    async def ShutdownVm(self, req: pb.Id, ctx: CallContext) -> Empty:
        await self.app.shutdown_vm(req.id)
        return Empty()

    async def RemoveVm(self, req: pb.Id, ctx: CallContext) -> Empty:
        await self.app.remove_vm(req.id)
        return Empty()

    async def UpdateVm(self, req: pb.UpdateVmRequest, ctx: CallContext) -> pb.Id:
        return pb.Id(id=await self.app.update_vm(req))

    async def UpgradeApp(self, req: pb.UpdateVmRequest, ctx: CallContext) -> pb.Id:
        return pb.Id(id=await self.app.update_vm(req))

    async def ResizeVm(self, req: pb.ResizeVmRequest, ctx: CallContext) -> Empty:
        await self.app.resize_vm(req)
        return Empty()

    async def GetComposeHash(self, req: pb.VmConfiguration, ctx: CallContext) -> pb.ComposeHash:
        if not req.name:
            raise Refused("the vm needs a name")
        validate_app_compose(req.compose_file)
        return pb.ComposeHash(hash=hashlib.sha256(req.compose_file.encode()).hexdigest())

    async def Status(self, req: pb.StatusRequest, ctx: CallContext) -> pb.StatusResponse:
        vms = sorted(self.app.vms.values(), key=lambda v: v.manifest.created_at_ms)
        if req.ids:
            wanted = set(req.ids)
            vms = [v for v in vms if v.id in wanted]
        if req.keyword:
            k = req.keyword
            vms = [
                v
                for v in vms
                if k in v.manifest.name
                or k in v.id
                or k in v.manifest.app_id
                or k in v.manifest.image
            ]
        total = len(vms)
        if req.page and req.page_size:
            start = (req.page - 1) * req.page_size
            vms = vms[start : start + req.page_size]
        return pb.StatusResponse(
            vms=self.app.vm_infos(vms, brief=req.brief),
            port_mapping_enabled=self.app.config.port_mapping_enabled,
            total=total,
        )

    async def ListImages(self, _: Empty, ctx: CallContext) -> pb.ImageListResponse:
        return pb.ImageListResponse(
            images=[
                pb.ImageInfo(
                    name=i.name,
                    description=json.dumps(i.metadata),
                    version=i.version,
                    is_dev=bool(i.metadata.get("is_dev", False)),
                )
                for i in self.app.images().values()
            ]
        )

    async def GetAppEnvEncryptPubKey(self, req: pb.AppId, ctx: CallContext) -> pb.PublicKeyResponse:
        url = self.app.config.kms_url
        if not url:
            raise Refused(KMS_NOT_CONFIGURED)
        # upstream does not verify the KMS's certificate here; clients check the signature
        async with PrpcClient(url, prefix="/prpc", verify_server=lambda _: None) as kms:
            try:
                return await kms.call("GetAppEnvEncryptPubKey", req, pb.PublicKeyResponse)
            except OSError as e:
                raise KmsUnavailable(f"kms unreachable: {e}") from e

    async def GetInfo(self, req: pb.Id, ctx: CallContext) -> pb.GetInfoResponse:
        vm = self.app.vms.get(req.id)
        if vm is None:
            return pb.GetInfoResponse(found=False)
        return pb.GetInfoResponse(found=True, info=self.app.vm_info(vm))

    async def Version(self, _: Empty, ctx: CallContext) -> pb.VersionResponse:
        return pb.VersionResponse(version=__version__, rev=f"pydstack (dstack {UPSTREAM_VERSION})")

    async def GetMeta(self, _: Empty, ctx: CallContext) -> pb.GetMetaResponse:
        c = self.app.config
        caps = self.app.backend.capabilities
        return pb.GetMetaResponse(
            kms=pb.KmsSettings(url=(c.kms_urls or ("",))[0], urls=list(c.kms_urls)),
            gateway=pb.GatewaySettings(
                url=(c.gateway_urls or ("",))[0],
                urls=list(c.gateway_urls),
                base_domain=c.gateway_base_domain,
                port=c.gateway_port,
                agent_port=c.gateway_agent_port,
            ),
            resources=pb.ResourcesSettings(
                max_cvm_number=c.max_cvm_number,
                max_allocable_vcpu=c.max_allocable_vcpu,
                max_allocable_memory_in_mb=c.max_allocable_memory_in_mb,
            ),
            networking=pb.NetworkingCapabilities(
                supported_modes=list(caps.networking_modes),
                default_mode=caps.default_networking_mode,
                default_bridge=caps.default_bridge,
            ),
        )

    async def ListGpus(self, _: Empty, ctx: CallContext) -> pb.ListGpusResponse:
        caps = self.app.backend.capabilities
        if not caps.gpus:
            return pb.ListGpusResponse(gpus=[], allow_attach_all=False)
        return pb.ListGpusResponse(
            gpus=[
                pb.GpuInfo(
                    slot=g.slot,
                    product_id=g.product_id,
                    description=g.description,
                    is_free=g.is_free,
                )
                for g in self.app.backend.list_gpus()
            ],
            allow_attach_all=caps.allow_attach_all_gpus,
        )

    async def ReloadVms(self, _: Empty, ctx: CallContext) -> pb.ReloadVmsResponse:
        loaded, updated, removed = await self.app.reload()
        return pb.ReloadVmsResponse(loaded=loaded, updated=updated, removed=removed)

    async def SvList(self, _: Empty, ctx: CallContext) -> pb.SvListResponse:
        out = pb.SvListResponse()
        for vm in self.app.vms.values():
            proc = self.app.backend.process(vm) if self.app.is_running(vm) else None
            out.processes.append(
                pb.SvProcessInfo(
                    id=vm.id,
                    name=vm.manifest.name,
                    status="running" if proc else "stopped",
                    pid=proc.pid if proc else None,
                    command=proc.command if proc else "",
                    note='{"kind":"cvm"}',
                )
            )
        return out

    async def SvStop(self, req: pb.Id, ctx: CallContext) -> Empty:
        await self.app.stop_vm(req.id)
        return Empty()

    async def SvRemove(self, req: pb.Id, ctx: CallContext) -> Empty:
        vm = self.app.get(req.id)
        if self.app.is_running(vm):
            raise InvalidState("the process is still running")
        return Empty()

    async def ListRegistryImages(self, _: Empty, ctx: CallContext) -> pb.RegistryImageListResponse:
        return await self.images.list()

    async def PullRegistryImage(self, req: pb.PullRegistryImageRequest, ctx: CallContext) -> Empty:
        self.images.pull(req.tag)
        return Empty()

    async def DeleteImage(self, req: pb.Id, ctx: CallContext) -> Empty:
        self.images.delete(req.id)
        return Empty()


class ProxiedGuest:
    """`/guest/<Method>`: forwarded to the CVM's guest API."""

    def __init__(self, app: VmmApp) -> None:
        self.app = app

    async def _call(self, vm_id: str, method: str, resp: type) -> object:
        return await self.app.guest_call(vm_id, method, Empty(), resp)

    async def Info(self, req: gpb.Id, ctx: CallContext) -> gpb.GuestInfo:
        return await self.app.guest_call(req.id, "Info", Empty(), gpb.GuestInfo)

    async def SysInfo(self, req: gpb.Id, ctx: CallContext) -> gpb.SystemInfo:
        return await self.app.guest_call(req.id, "SysInfo", Empty(), gpb.SystemInfo)

    async def NetworkInfo(self, req: gpb.Id, ctx: CallContext) -> gpb.NetworkInformation:
        return await self.app.guest_call(req.id, "NetworkInfo", Empty(), gpb.NetworkInformation)

    async def ListContainers(self, req: gpb.Id, ctx: CallContext) -> gpb.ListContainersResponse:
        return await self.app.guest_call(
            req.id, "ListContainers", Empty(), gpb.ListContainersResponse
        )

    async def Shutdown(self, req: gpb.Id, ctx: CallContext) -> Empty:
        await self.app.shutdown_vm(req.id)
        return Empty()


# ---------------------------------------------------------------------- auth
def auth_middleware(tokens: tuple[str, ...], htpasswd: Htpasswd | None = None) -> Middleware:
    """the VMM's token and htpasswd auth (:func:`pydstack.rpc.auth.auth_middleware`)."""
    return shared_auth_middleware(tokens, htpasswd, realm="dstack-vmm API")


# ---------------------------------------------------------------------- logs
def _tail(path: Path, lines: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            block = 64 * 1024
            data = b""
            pos = size
            while pos > 0 and data.count(b"\n") <= lines:
                pos = max(0, pos - block)
                f.seek(pos)
                data = f.read(size - pos)
                if size - pos > 64 * 1024 * 1024:
                    break
    except FileNotFoundError:
        return b""
    parts = data.split(b"\n")
    if len(parts) > lines + 1:
        parts = parts[-(lines + 1) :]
    return b"\n".join(parts)


def add_routes(server: PrpcServer, app: VmmApp) -> None:
    async def logs(request: web.Request) -> web.StreamResponse:
        vm_id = request.query.get("id", "")
        vm = app.vms.get(vm_id)
        if vm is None:
            return web.Response(status=404, text=f"vm not found: {vm_id[:64]}\n")
        ch = request.query.get("ch", "serial")
        files = {"serial": "serial.log", "stdout": "stdout.log", "stderr": "stdout.log"}
        if ch not in files:
            return web.Response(status=400, text="ch must be serial, stdout or stderr\n")
        asked = ascii_decimal(request.query.get("lines", "10000"), 9)
        if asked is None:
            return web.Response(status=400, text="lines must be a non-negative number\n")
        lines = min(asked, MAX_LOG_LINES)
        follow = request.query.get("follow", "false") in ("1", "true", "")
        ansi = request.query.get("ansi", "true") in ("1", "true", "")
        path = vm.workdir.path / files[ch]

        def clean(data: bytes) -> bytes:
            return data if ansi else ANSI.sub(b"", data)

        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await resp.prepare(request)
        data = await asyncio.to_thread(_tail, path, lines)
        await resp.write(clean(data))
        if follow:
            pos = path.stat().st_size if path.exists() else 0
            quiet = time.monotonic()
            while vm.id in app.vms:
                await asyncio.sleep(0.5)
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue
                if size < pos:  # rotated
                    pos = 0
                if size > pos:
                    with open(path, "rb") as f:
                        f.seek(pos)
                        chunk = f.read(min(size - pos, 1024 * 1024))
                    pos += len(chunk)
                    await resp.write(clean(chunk))
                    quiet = time.monotonic()
                elif time.monotonic() - quiet > 60:
                    await resp.write(b"[vmm heartbeat]\n")
                    quiet = time.monotonic()
        await resp.write_eof()
        return resp

    async def index(_: web.Request) -> web.Response:
        html = importlib.resources.files("pydstack.vmm").joinpath("ui.html").read_text()
        title = f"{app.config.node_name} | dstack-vmm" if app.config.node_name else "dstack-vmm"
        page = html.replace("{{TITLE}}", escape(title))
        return web.Response(text=page, content_type="text/html")

    server.app.router.add_get("/logs", logs)
    for path in ("/", "/v1", "/beta"):
        server.app.router.add_get(path, index)


def build_server(app: VmmApp) -> PrpcServer:
    """the external server of `app`; ConfigError for an unreadable or invalid htpasswd file."""
    htpasswd = None
    if app.config.auth_enabled and app.config.auth_htpasswd_file is not None:
        htpasswd = Htpasswd.load(app.config.auth_htpasswd_file)
    server = PrpcServer(
        response_headers={"X-App-Version": __version__, "X-Accel-Buffering": "no"},
        max_body=10 * 1024 * 1024,
        limits=app.config.server_limits,
        guard=app.config.guard(),
    )
    if app.config.auth_enabled:
        server.app.middlewares.append(auth_middleware(app.config.auth_tokens, htpasswd))
    server.mount(
        PrpcService(
            VMM, VmmService(app), prefix="/prpc", trim="Teepod.", get_methods=VMM_GET_METHODS
        )
    )
    server.mount(
        PrpcService(
            PROXIED_GUEST, ProxiedGuest(app), prefix="/guest", get_methods=PROXIED_GET_METHODS
        )
    )
    add_routes(server, app)
    return server
