"""the gateway's prpc services (§1.3-1.5): ``Gateway`` on the main server, ``Debug`` on the
debug server, ``Admin`` on the admin server; thin translations between messages and
:class:`~.control.GatewayControl`.

Refusals reach the caller as the error message of a 400 (domain errors carry it); a handler
bug is a 500 "internal error" and the server keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from google.protobuf.empty_pb2 import Empty

from pydstack import __version__
from pydstack.attest.evidence import EvidenceVerifier
from pydstack.attest.ratls import parse_ratls_cert
from pydstack.errors import DstackError
from pydstack.rpc.proto import gateway_rpc_pb2 as pb
from pydstack.rpc.server import CallContext, PrpcService, RpcError

from .control import GatewayControl, NodeIdentity, RegistrationRefused
from .identity import AuthWebhook, CallerIdentity, caller_identity
from .policy import PortPolicy, PortPolicyError
from .routes import RouteTable
from .store import InstanceRecord, NodeInfo
from .zt_admin import ZtAdminMethods
from .zt_certs import ZtCerts

log = logging.getLogger(__name__)

GATEWAY = pb.DESCRIPTOR.services_by_name["Gateway"]
DEBUG = pb.DESCRIPTOR.services_by_name["Debug"]
ADMIN = pb.DESCRIPTOR.services_by_name["Admin"]
GATEWAY_GET_METHODS = frozenset({"Info", "AcmeInfo"})
DEBUG_GET_METHODS = frozenset({"Info", "GetSyncData", "GetProxyState"})
ADMIN_GET_METHODS = frozenset(
    {"Status", "GetInfo", "GetMeta", "GetInstancePortPolicy", "GetNodeStatuses", "WaveKvStatus"}
)


def policy_from_message(msg: pb.PortPolicy) -> PortPolicy:
    """PortPolicyError for a port outside 1..65535 or too many ports."""
    return PortPolicy.from_entries(msg.restrict_mode, [(p.port, p.pp) for p in msg.ports])


def policy_to_message(policy: PortPolicy) -> pb.PortPolicy:
    return pb.PortPolicy(
        restrict_mode=policy.restrict_mode,
        ports=[pb.PortAttrs(port=p, pp=pp) for p, pp in sorted(policy.ports.items())],
    )


@dataclass
class GatewayContext:
    """what the services share: the control plane, the table, and the public facts."""

    control: GatewayControl
    table: RouteTable
    base_domain: str
    external_port: int
    agent_port: int
    app_address_ns_prefix: str
    verifier: EvidenceVerifier | None = None
    skip_attestation: bool = False
    webhook: AuthWebhook | None = None
    #: this gateway's own app id (from its guest agent), "" when it has none
    app_id: str = ""
    bootnode_url: str = ""
    acme_info: Callable[[], Awaitable[pb.AcmeInfoResponse]] | None = None
    #: called by Admin.Exit(force)
    exit: Callable[[bool], None] = field(default=lambda force: None)
    #: called by Admin.ReloadCert
    reload_cert: Callable[[], Awaitable[None]] | None = None
    #: the certbot (None: ``[core.certbot] enabled = false``)
    zt: ZtCerts | None = None
    #: a cluster's connection counts (instance → node → open connections), None when alone
    global_connections: Callable[[], Awaitable[dict[str, dict[int, int]]]] | None = None

    @property
    def node(self) -> NodeIdentity:
        return self.control.node

    def info(self) -> pb.InfoResponse:
        return pb.InfoResponse(
            base_domain=self.base_domain,
            external_port=self.external_port,
            app_address_ns_prefix=self.app_address_ns_prefix,
            version=__version__,
        )

    def node_info(self, n: NodeInfo | None = None) -> pb.GatewayNodeInfo:
        """`n` (this node by default) as the wire describes a gateway node."""
        n = n or self.node.info()
        return pb.GatewayNodeInfo(
            id=n.node_id,
            uuid=n.uuid,
            url=n.url,
            last_seen=int(self.control.clock()),
            wg_public_key=n.wg_public_key,
            wg_ip=n.wg_ip,
            wg_endpoint=n.wg_endpoint,
        )

    def response(self, rec: InstanceRecord) -> pb.RegisterCvmResponse:
        active = self.control.active_nodes()
        return pb.RegisterCvmResponse(
            wg=pb.WireGuardConfig(
                client_ip=rec.ip,
                servers=[
                    pb.WireGuardPeer(pk=n.wg_public_key, ip=n.wg_ip, endpoint=n.wg_endpoint)
                    for n in active
                ],
            ),
            agent=pb.GuestAgentConfig(
                external_port=self.external_port,
                internal_port=self.agent_port,
                domain=self.base_domain,
                app_address_ns_prefix=self.app_address_ns_prefix,
            ),
            gateways=[self.node_info(n) for n in active],
        )

    async def register(
        self, caller: CallerIdentity, public_key: str, policy: PortPolicy | None
    ) -> pb.RegisterCvmResponse:
        if self.webhook is not None:
            await self.webhook.check(caller)
        rec = await self.control.register(
            caller.app_id, caller.instance_id, caller.compose_hash, public_key, policy
        )
        return self.response(rec)

    def host_info(self, rec: InstanceRecord) -> pb.HostInfo:
        return pb.HostInfo(
            instance_id=rec.instance_id,
            ip=rec.ip,
            app_id=rec.app_id,
            base_domain=self.base_domain,
            latest_handshake=int(self.control.latest_handshake(rec.public_key)),
            num_connections=self.table.connections(rec.instance_id),
        )


def _refusal(e: DstackError) -> RpcError:
    return RpcError(str(e))


class GatewayService:
    """``Gateway`` (main server, behind TLS with optional client certificates)."""

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx

    async def RegisterCvm(
        self, req: pb.RegisterCvmRequest, call: CallContext
    ) -> pb.RegisterCvmResponse:
        caller = await caller_identity(
            call.peer_cert, self.ctx.verifier, skip_attestation=self.ctx.skip_attestation
        )
        policy = None
        if req.HasField("port_policy"):
            try:
                policy = policy_from_message(req.port_policy)
            except PortPolicyError as e:
                raise RpcError(f"invalid port policy: {e}") from None
        try:
            return await self.ctx.register(caller, req.client_public_key, policy)
        except RegistrationRefused as e:
            log.info("refused registration of instance %s: %s", caller.instance_id, e)
            raise _refusal(e) from None

    async def AcmeInfo(self, req: Empty, call: CallContext) -> pb.AcmeInfoResponse:
        if self.ctx.acme_info is None:
            return pb.AcmeInfoResponse()
        return await self.ctx.acme_info()

    async def Info(self, req: Empty, call: CallContext) -> pb.InfoResponse:
        return self.ctx.info()

    async def GetPeers(self, req: Empty, call: CallContext) -> pb.GetPeersResponse:
        if not self.ctx.skip_attestation:
            if call.peer_cert is None:
                raise RpcError("Client authentication is required")
            try:
                remote = parse_ratls_cert(call.peer_cert).app_id
            except DstackError:
                remote = None
            if not self.ctx.app_id or remote is None or remote.hex() != self.ctx.app_id:
                raise RpcError("Remote app id is not from dstack-gateway")
        n = self.ctx.node
        return pb.GetPeersResponse(
            my_id=n.node_id,
            my_url=n.url,
            peers=[pb.PeerInfo(id=p.node_id, url=p.url) for p in self.ctx.control.known_nodes()],
        )


class DebugService:
    """``Debug`` (only with ``core.debug.insecure_enable_debug_rpc``): no attestation."""

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx

    async def RegisterCvm(
        self, req: pb.DebugRegisterCvmRequest, call: CallContext
    ) -> pb.RegisterCvmResponse:
        caller = CallerIdentity(req.app_id.lower(), req.instance_id.lower(), "")
        try:
            return await self.ctx.register(caller, req.client_public_key, None)
        except RegistrationRefused as e:
            raise _refusal(e) from None

    async def Info(self, req: Empty, call: CallContext) -> pb.InfoResponse:
        return self.ctx.info()

    async def GetSyncData(self, req: Empty, call: CallContext) -> pb.DebugSyncDataResponse:
        state = self.ctx.control.store.load()
        n = self.ctx.node
        return pb.DebugSyncDataResponse(
            my_node_id=n.node_id,
            nodes=[
                pb.NodeInfoEntry(
                    node_id=p.node_id,
                    url=p.url,
                    wg_public_key=p.wg_public_key,
                    wg_endpoint=p.wg_endpoint,
                    wg_ip=p.wg_ip,
                )
                for p in self.ctx.control.known_nodes()
            ],
            instances=[
                pb.InstanceEntry(
                    instance_id=i.instance_id, app_id=i.app_id, ip=i.ip, public_key=i.public_key
                )
                for i in state.instances.values()
            ],
            persistent_keys=len(state.instances) + len(state.node_status) + len(state.nodes),
        )

    async def GetProxyState(self, req: Empty, call: CallContext) -> pb.DebugProxyStateResponse:
        insts = self.ctx.table.instances()
        return pb.DebugProxyStateResponse(
            instances=[
                pb.ProxyStateInstance(
                    instance_id=i.instance_id,
                    app_id=i.app_id,
                    ip=i.ip,
                    public_key=i.public_key,
                    reg_time=int(i.reg_time),
                )
                for i in insts
            ],
            allocated_addresses=sorted(i.ip for i in insts),
        )


class AdminService(ZtAdminMethods):
    """``Admin`` (admin server, behind token or htpasswd auth); the certificate methods are
    :class:`~.zt_admin.ZtAdminMethods`."""

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        self.zt = ctx.zt

    def _records(self) -> list[InstanceRecord]:
        return sorted(self.ctx.control.store.load().instances.values(), key=lambda r: r.ip)

    async def Status(self, req: Empty, call: CallContext) -> pb.StatusResponse:
        hosts = [self.ctx.host_info(r) for r in self._records()]
        n = self.ctx.node
        return pb.StatusResponse(
            id=n.node_id,
            url=n.url,
            bootnode_url=self.ctx.bootnode_url,
            num_connections=sum(h.num_connections for h in hosts),
            hosts=hosts,
            nodes=[self.ctx.node_info(p) for p in self.ctx.control.known_nodes()],
            uuid=n.uuid,
            accel=pb.ProxyAccelStatus(ktls_mode="off", splice_mode="off"),
        )

    async def GetInfo(self, req: pb.GetInfoRequest, call: CallContext) -> pb.GetInfoResponse:
        rec = self.ctx.control.store.load().instances.get(req.id)
        if rec is None:
            return pb.GetInfoResponse(found=False)
        return pb.GetInfoResponse(found=True, info=self.ctx.host_info(rec))

    async def GetMeta(self, req: Empty, call: CallContext) -> pb.GetMetaResponse:
        return pb.GetMetaResponse(registered=len(self._records()), online=self.ctx.control.online())

    async def Exit(self, req: pb.ExitRequest, call: CallContext) -> Empty:
        log.info("exit requested through the admin api (force=%s)", req.force)
        self.ctx.exit(req.force)
        return Empty()

    async def ReloadCert(self, req: Empty, call: CallContext) -> Empty:
        if self.ctx.reload_cert is None:
            raise RpcError(
                "no certificate source to reload from (no static certificate, no certbot)"
            )
        await self.ctx.reload_cert()
        return Empty()

    async def SetNodeStatus(self, req: pb.SetNodeStatusRequest, call: CallContext) -> Empty:
        try:
            await self.ctx.control.set_node_status(req.id, req.status)
        except RegistrationRefused as e:
            raise _refusal(e) from None
        return Empty()

    async def GetNodeStatuses(self, req: Empty, call: CallContext) -> pb.GetNodeStatusesResponse:
        state = self.ctx.control.store.load()
        ids = sorted({self.ctx.node.node_id, *state.node_status, *state.nodes})
        return pb.GetNodeStatusesResponse(
            statuses=[pb.NodeStatusEntry(node_id=i, status=state.status_of(i)) for i in ids]
        )

    async def WaveKvStatus(self, req: Empty, call: CallContext) -> pb.WaveKvStatusResponse:
        return pb.WaveKvStatusResponse(enabled=False)

    async def GetInstanceHandshakes(
        self, req: pb.GetInstanceHandshakesRequest, call: CallContext
    ) -> pb.GetInstanceHandshakesResponse:
        rec = self.ctx.control.store.load().instances.get(req.instance_id)
        if rec is None:
            return pb.GetInstanceHandshakesResponse()
        seen = dict(self.ctx.control.cluster_handshakes.get(rec.instance_id, {}))
        seen[self.ctx.node.node_id] = int(self.ctx.control.latest_handshake(rec.public_key))
        return pb.GetInstanceHandshakesResponse(
            handshakes=[
                pb.HandshakeEntry(observer_node_id=node, timestamp=ts)
                for node, ts in sorted(seen.items())
                if ts
            ]
        )

    async def GetGlobalConnections(
        self, req: Empty, call: CallContext
    ) -> pb.GlobalConnectionsStats:
        total = sum(self.ctx.table.connections(r.instance_id) for r in self._records())
        nodes = {self.ctx.node.node_id: total}
        if self.ctx.global_connections is not None:
            for per_node in (await self.ctx.global_connections()).values():
                for node_id, count in per_node.items():
                    if node_id != self.ctx.node.node_id:
                        nodes[node_id] = nodes.get(node_id, 0) + count
        return pb.GlobalConnectionsStats(
            total_connections=sum(nodes.values()), node_connections=nodes
        )

    async def SetInstancePortPolicy(
        self, req: pb.SetInstancePortPolicyRequest, call: CallContext
    ) -> Empty:
        try:
            policy = policy_from_message(req.policy)
        except PortPolicyError as e:
            raise RpcError(f"invalid port policy: {e}") from None
        await self.ctx.control.set_admin_policy(req.instance_id, policy)
        return Empty()

    async def ClearInstancePortPolicy(
        self, req: pb.ClearInstancePortPolicyRequest, call: CallContext
    ) -> Empty:
        await self.ctx.control.set_admin_policy(req.instance_id, None)
        return Empty()

    async def GetInstancePortPolicy(
        self, req: pb.GetInstancePortPolicyRequest, call: CallContext
    ) -> pb.GetInstancePortPolicyResponse:
        inst = self.ctx.table.get(req.instance_id)
        if inst is None:
            raise RpcError(f"instance {req.instance_id[:64]} is not registered")
        effective, source = inst.policy()
        resp = pb.GetInstancePortPolicyResponse(source=source.value)
        if effective is not None:
            resp.effective.CopyFrom(policy_to_message(effective))
        if inst.reported_policy is not None:
            resp.instance_reported.CopyFrom(policy_to_message(inst.reported_policy))
        if inst.admin_policy is not None:
            resp.admin_override.CopyFrom(policy_to_message(inst.admin_policy))
        return resp


def gateway_service(ctx: GatewayContext) -> PrpcService:
    return PrpcService(
        GATEWAY,
        GatewayService(ctx),
        prefix="/prpc/",
        trim="Tproxy.",
        get_methods=GATEWAY_GET_METHODS,
    )


def debug_service(ctx: GatewayContext) -> PrpcService:
    return PrpcService(
        DEBUG, DebugService(ctx), prefix="/prpc/", trim="Debug.", get_methods=DEBUG_GET_METHODS
    )


def admin_services(ctx: GatewayContext) -> list[PrpcService]:
    """``Admin`` at both ``/`` and ``/prpc`` ("Admin." trimmed), as upstream mounts it."""
    impl = AdminService(ctx)
    return [
        PrpcService(ADMIN, impl, prefix=p, trim="Admin.", get_methods=ADMIN_GET_METHODS)
        for p in ("/prpc/", "/")
    ]
