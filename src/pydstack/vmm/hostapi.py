"""the host API one CVM sees: `HostApi` (`/api`: Info, Notify, GetSealingKey) and the simulated
TD's `TdxHost` (`/tdx`), on a socket that is this CVM's alone, so the socket identifies the CVM
as the vsock CID does upstream. Where the socket is and how the guest reaches it is the
backend's :class:`~pydstack.vmm.backends.HostApiChannel`.
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.empty_pb2 import Empty

from pydstack import __version__
from pydstack.rpc.limits import ServerLimits
from pydstack.rpc.proto import host_api_pb2 as hpb
from pydstack.rpc.server import CallContext, PrpcServer, PrpcService

from .backends import HostApiChannel
from .errors import Refused
from .td import TDX_HOST, TdxHostImpl
from .vm import Vm

HOST_API = hpb.DESCRIPTOR.services_by_name["HostApi"]
#: a host API request carries a notification or a quote request: small
MAX_BODY = 64 * 1024


class HostApiImpl:
    """HostApi for one CVM; `notified` persists what the guest reported."""

    def __init__(self, vm: Vm, notified: Callable[[Vm], None]) -> None:
        self.vm = vm
        self.notified = notified

    async def Info(self, _: Empty, ctx: CallContext) -> hpb.HostInfo:
        return hpb.HostInfo(name="dstack VMM", version=__version__)

    async def Notify(self, req: hpb.Notification, ctx: CallContext) -> Empty:
        self.vm.runtime.notify(req.event, req.payload)
        self.notified(self.vm)
        return Empty()

    async def GetSealingKey(
        self, req: hpb.GetSealingKeyRequest, ctx: CallContext
    ) -> hpb.GetSealingKeyResponse:
        raise Refused("no local key provider on this host (use the kms key provider)")


async def serve_host_api(
    vm: Vm, channel: HostApiChannel, limits: ServerLimits, notified: Callable[[Vm], None]
) -> PrpcServer:
    """listen on the CVM's channel (socket 0600, owned by the VMM's user)."""
    channel.socket.parent.mkdir(exist_ok=True)
    server = PrpcServer(max_body=MAX_BODY, limits=limits)
    server.mount(PrpcService(HOST_API, HostApiImpl(vm, notified), prefix="/api"))
    server.mount(PrpcService(TDX_HOST, TdxHostImpl(lambda: vm.td), prefix="/tdx"))
    await server.listen_unix(channel.socket, mode=0o600)
    return server
