"""the gateway's control plane: registrations, WireGuard peers, recycling, port policies and node
status, kept in the :class:`~.store.StateStore` and mirrored into the data plane's
:class:`~.routes.RouteTable` (§1.3, §3.1).

:meth:`GatewayControl.register` (RegisterCvm after the caller's identity is known) refuses, with
nothing changed, when this node is marked down, the WireGuard key is not base64 of 32 bytes or
is used by another instance, or the instance id is registered to another app
(:class:`RegistrationRefused`). A known instance keeps its address while it is still usable,
takes the new key (its ``reg_time`` moves only when the key changed), drops its cached port
policy when its compose hash changed, and takes a newly reported one. A new instance gets the
first free address. The store commits first; then the table, the WireGuard config (rendered
from the store's instances, applied with ``wg syncconf``) and the workers follow.

In a cluster (the store is etcd) the same holds across nodes: :meth:`GatewayControl.announce`
publishes this node, :meth:`GatewayControl.active_nodes` is every known node not marked down
(what CVMs peer with), :meth:`GatewayControl.sync_state` takes the other nodes' changes into the
table and the WireGuard peers, and a registration the store cannot take while etcd is away is
refused with :data:`STORE_UNAVAILABLE` (nothing changed).

Nothing here runs per proxied connection: the handshake map reaches the table from the poller
(:meth:`GatewayControl.poll_handshakes`, every 10 s), and the lazy policy fetch writes back through
:meth:`GatewayControl.policy_fetched`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Protocol

from pydstack.errors import DstackError, NotFoundError, UnavailableError

from .policy import PortPolicy
from .routes import Instance, RouteConflictError, RouteTable
from .store import NODE_DOWN, NODE_UP, GatewayState, InstanceRecord, NodeInfo, StateStore
from .wgconf import HandshakeCache, WgKeyError, WgNetwork, WgPeer, check_public_key, render_config

log = logging.getLogger(__name__)

#: upstream's wire string for a registration on a node marked down
NODE_DOWN_MESSAGE = "this gateway node is marked as down and does not accept new registrations"
#: a peer counts as online in GetMeta when its last handshake is this recent (seconds)
ONLINE_WINDOW = 300.0
#: a change the cluster's store could not take (etcd away): nothing changed
STORE_UNAVAILABLE = (
    "the gateway cluster's state store is unavailable; nothing was changed, retry later"
)
#: the most instances one removal changes (one etcd transaction)
REMOVE_BATCH = 100


class RegistrationRefused(DstackError):
    """a RegisterCvm (or an admin change) that the gateway refuses; nothing changed."""


class WgApplier(Protocol):
    """what the control plane needs of the WireGuard interface."""

    async def apply(self, config: str) -> None: ...

    async def latest_handshakes(self) -> dict[str, float]: ...


@dataclass(frozen=True)
class NodeIdentity:
    """this gateway node as RegisterCvm and Status describe it."""

    node_id: int
    url: str
    wg_public_key: str
    wg_private_key: str
    wg_ip: str
    wg_endpoint: str
    wg_listen_port: int
    uuid: bytes = b""

    def info(self) -> NodeInfo:
        """what other nodes and CVMs learn of this node."""
        return NodeInfo(
            self.node_id, self.url, self.wg_public_key, self.wg_endpoint, self.wg_ip, self.uuid
        )


def to_instance(rec: InstanceRecord) -> Instance:
    return Instance(
        instance_id=rec.instance_id,
        app_id=rec.app_id,
        ip=rec.ip,
        public_key=rec.public_key,
        compose_hash=rec.compose_hash,
        reported_policy=rec.port_policy,
        admin_policy=rec.admin_port_policy,
        reg_time=rec.reg_time,
    )


class GatewayControl:
    """the registrations of one gateway node."""

    def __init__(
        self,
        store: StateStore,
        table: RouteTable,
        network: WgNetwork,
        node: NodeIdentity,
        wg: WgApplier | None,
        *,
        publish: Callable[[], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.time,
        handshakes: HandshakeCache | None = None,
    ) -> None:
        self.store = store
        self.table = table
        self.network = network
        self.node = node
        self.wg = wg
        self.publish = publish
        self.clock = clock
        self.handshakes = handshakes or HandshakeCache()
        self._lock = asyncio.Lock()
        self._applied: str | None = None
        #: instance id → node id → latest handshake that node saw (a cluster's, else empty)
        self.cluster_handshakes: dict[str, dict[int, int]] = {}

    # ------------------------------------------------------------------ start
    async def start(self) -> None:
        """load the stored instances into the table and configure WireGuard with them."""
        state = self.store.load()
        for rec in state.instances.values():
            self.table.upsert(to_instance(rec))
        await self._reconfigure(state)
        await self._publish()

    # ------------------------------------------------------------------ registration
    async def register(
        self,
        app_id: str,
        instance_id: str,
        compose_hash: str,
        public_key: str,
        policy: PortPolicy | None,
    ) -> InstanceRecord:
        """register (or re-register) an instance; RegistrationRefused for every §1.3 refusal,
        IpPoolExhausted when no address is left."""
        if not app_id or not instance_id:
            raise RegistrationRefused("app_id or instance_id is empty")
        try:
            check_public_key(public_key)
        except WgKeyError as e:
            raise RegistrationRefused(str(e)) from None
        now = self.clock()
        node_id = self.node.node_id
        network = self.network

        def tx(state: GatewayState) -> InstanceRecord:
            if state.status_of(node_id) == NODE_DOWN:
                raise RegistrationRefused(NODE_DOWN_MESSAGE)
            owner = state.key_owner(public_key)
            if owner is not None and owner != instance_id:
                raise RegistrationRefused("the wireguard public key is used by another instance")
            old = state.instances.get(instance_id)
            if old is not None and old.app_id != app_id:
                raise RegistrationRefused("the instance id is registered to another app")
            if old is None:
                ip = network.alloc(state.allocated())
                rec = InstanceRecord(instance_id, app_id, ip, public_key, now, compose_hash)
            else:
                others = {i.ip for i in state.instances.values() if i.instance_id != instance_id}
                ip = old.ip
                if not network.usable(ip) or ip in others:
                    ip = network.alloc(others | {old.ip})
                reg_time = now if old.public_key != public_key else old.reg_time
                rec = replace(
                    old, ip=ip, public_key=public_key, reg_time=reg_time, compose_hash=compose_hash
                )
                if old.port_policy_hash != compose_hash:
                    rec = replace(rec, port_policy=None, port_policy_hash="")
            if policy is not None:
                rec = replace(rec, port_policy=policy, port_policy_hash=compose_hash)
            state.instances[instance_id] = rec
            return rec

        async with self._lock:
            try:
                rec = await self.store.transact(tx)
            except UnavailableError as e:
                log.warning("registration of %s not stored: %s", instance_id, e)
                raise RegistrationRefused(STORE_UNAVAILABLE) from None
            self._upsert(to_instance(rec))
            await self._reconfigure()
        await self._publish()
        log.info("registered instance %s of app %s at %s", instance_id, app_id, rec.ip)
        return rec

    async def remove(self, instance_ids: list[str]) -> list[str]:
        """forget instances (their addresses are free again); the ids actually removed."""

        def tx(state: GatewayState) -> list[str]:
            return [i for i in instance_ids if state.instances.pop(i, None) is not None]

        async with self._lock:
            gone = await self.store.transact(tx)
            for iid in gone:
                self.table.remove(iid)
            if gone:
                await self._reconfigure()
        if gone:
            await self._publish()
        return gone

    # ------------------------------------------------------------------ policies
    async def set_admin_policy(self, instance_id: str, policy: PortPolicy | None) -> None:
        """the admin override (None clears it); NotFoundError for an unknown instance."""

        def tx(state: GatewayState) -> InstanceRecord:
            rec = state.instances.get(instance_id)
            if rec is None:
                raise NotFoundError(f"instance {instance_id[:64]} is not registered")
            rec = replace(rec, admin_port_policy=policy)
            state.instances[instance_id] = rec
            return rec

        async with self._lock:
            rec = await self.store.transact(tx)
            self.table.set_admin_policy(instance_id, rec.admin_port_policy)
        await self._publish()

    def policy_fetched(self, instance_id: str, policy: PortPolicy) -> None:
        """the lazy fetch's result: persist it (under the instance's compose hash) in the
        background; the fetcher already set it in the table."""

        def tx(state: GatewayState) -> None:
            rec = state.instances.get(instance_id)
            if rec is not None and rec.port_policy is None:
                state.instances[instance_id] = replace(
                    rec, port_policy=policy, port_policy_hash=rec.compose_hash
                )

        async def persist() -> None:
            try:
                await self.store.transact(tx)
            except Exception:
                log.exception("storing the fetched port policy of %s failed", instance_id)
            await self._publish()

        task = asyncio.get_running_loop().create_task(persist())
        task.add_done_callback(lambda _t: None)

    # ------------------------------------------------------------------ node status
    async def set_node_status(self, node_id: int, status: str) -> None:
        """RegistrationRefused unless `status` is "up" or "down"."""
        if status not in (NODE_UP, NODE_DOWN):
            raise RegistrationRefused('status must be "up" or "down"')

        def tx(state: GatewayState) -> None:
            state.node_status[node_id] = status

        await self.store.transact(tx)
        log.info("node %d marked %s", node_id, status)

    def node_status(self, node_id: int) -> str:
        return self.store.load().status_of(node_id)

    def known_nodes(self) -> list[NodeInfo]:
        """every node of the cluster (this one as it is now), by id."""
        nodes = dict(self.store.load().nodes)
        nodes[self.node.node_id] = self.node.info()
        return [nodes[k] for k in sorted(nodes)]

    def active_nodes(self) -> list[NodeInfo]:
        """the nodes CVMs should peer with: every known node not marked down."""
        state = self.store.load()
        return [n for n in self.known_nodes() if state.status_of(n.node_id) != NODE_DOWN]

    # ------------------------------------------------------------------ cluster
    async def announce(self) -> None:
        """publish this node's info and mark it up (a cluster node at start)."""
        info, node_id = self.node.info(), self.node.node_id

        def tx(state: GatewayState) -> None:
            state.nodes[node_id] = info
            state.node_status[node_id] = NODE_UP

        await self.store.transact(tx)

    async def sync_state(self, state: GatewayState) -> None:
        """follow the store's `state` changed by other nodes: the table, WireGuard, workers."""
        async with self._lock:
            wanted = {iid: to_instance(rec) for iid, rec in state.instances.items()}
            for inst in self.table.instances():
                new = wanted.get(inst.instance_id)
                if new is None or (new.app_id, new.public_key) != (inst.app_id, inst.public_key):
                    self.table.remove(inst.instance_id)
            for iid, inst in wanted.items():
                if self.table.get(iid) != inst:
                    self._upsert(inst)
            await self._reconfigure(state)
        await self._publish()

    def _upsert(self, inst: Instance) -> None:
        """put `inst` in the table, dropping what the store no longer has it conflict with."""
        try:
            self.table.upsert(inst)
        except RouteConflictError:
            for other in self.table.instances():
                if other.public_key == inst.public_key or other.instance_id == inst.instance_id:
                    self.table.remove(other.instance_id)
            self.table.upsert(inst)

    # ------------------------------------------------------------------ wireguard
    def render(self, state: GatewayState | None = None) -> str:
        state = state or self.store.load()
        peers = [WgPeer(i.public_key, i.ip) for i in state.instances.values()]
        return render_config(self.node.wg_private_key, self.node.wg_listen_port, peers)

    async def _reconfigure(self, state: GatewayState | None = None) -> None:
        """apply the rendered config when it changed (a failure is logged, as upstream)."""
        if self.wg is None:
            return
        text = self.render(state)
        if text == self._applied:
            return
        try:
            await self.wg.apply(text)
            self._applied = text
        except DstackError as e:
            log.error("applying the wireguard config failed: %s", e)

    async def poll_handshakes(self) -> None:
        """read ``latest-handshakes`` (when due) into the cache and the table."""
        if self.wg is None or not self.handshakes.due():
            return
        try:
            value: dict[str, float] | None = await self.wg.latest_handshakes()
        except DstackError as e:
            log.warning("reading wireguard handshakes failed: %s", e)
            value = None
        self.handshakes.update(value)
        current = self.handshakes.current()
        if value is not None or current is None:
            self.table.set_handshakes(current)
            await self._publish()

    def latest_handshake(self, public_key: str) -> float:
        hs = self.handshakes.current() or {}
        return hs.get(public_key, 0.0)

    def seen(self, rec: InstanceRecord) -> float:
        """the latest handshake with `rec` that this node or (in a cluster) any node saw."""
        others = self.cluster_handshakes.get(rec.instance_id, {})
        return max(self.latest_handshake(rec.public_key), *others.values(), 0.0)

    def online(self) -> int:
        now = self.clock()
        return sum(
            1
            for i in self.store.load().instances.values()
            if now - self.latest_handshake(i.public_key) < ONLINE_WINDOW
        )

    # ------------------------------------------------------------------ recycling
    async def recycle(self, timeout: float) -> list[str]:
        """remove instances registered more than `timeout` ago whose last handshake (with any
        node of a cluster) is also older than that (never counts as older)."""
        now = self.clock()
        stale = [
            i.instance_id
            for i in self.store.load().instances.values()
            if now - i.reg_time > timeout and now - self.seen(i) > timeout
        ]
        if not stale:
            return []
        gone: list[str] = []
        for i in range(0, len(stale), REMOVE_BATCH):
            gone += await self.remove(stale[i : i + REMOVE_BATCH])
        for iid in gone:
            log.info("recycled instance %s (no handshake for %.0f s)", iid, timeout)
        return gone

    async def _publish(self) -> None:
        if self.publish is not None:
            await self.publish()


def new_node_uuid() -> bytes:
    return uuid.uuid4().bytes
