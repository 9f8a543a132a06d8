"""where a gateway node keeps its state, from ``[core.sync]``: :func:`build_cluster`.

Without ``core.sync.enabled`` the node is alone: :class:`~.store.LocalFileStore` in
``data_dir``, the certbot's :class:`~pydstack.certbot.storage.FileKv` and
:class:`~pydstack.certbot.lock.FileDomainLock` beside it. With it, everything lives in etcd
under ``core.sync.etcd_prefix`` (:mod:`.etcdstore`): :func:`build_cluster` checks that etcd
answers and reads the state, else raises :class:`~pydstack.errors.UnavailableError` with one
line naming the endpoints (the gateway refuses to start rather than run on an empty state).
:meth:`Cluster.attach` then announces the node (``node/info``, status ``up``), follows the
other nodes' changes into the control plane (routes, WireGuard peers, workers), and pushes this
node's connection counts and handshake times every ``sync_connections_interval`` on a lease
(recycling then goes by the latest handshake any node saw, as upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pydstack.certbot.lock import DomainLock, FileDomainLock
from pydstack.certbot.storage import FileKv, KeyValue
from pydstack.errors import UnavailableError

from .control import GatewayControl
from .etcd import EtcdClient, EtcdError, EtcdTls, EtcdUnavailable
from .etcdstore import (
    EtcdDomainLock,
    EtcdKv,
    EtcdStore,
    NodeValues,
    connection_counts,
    handshake_times,
)
from .settings import GatewayConfig, SyncSettings
from .store import LocalFileStore, StateStore

log = logging.getLogger(__name__)

CERTBOT_KV_FILE = "certbot.json"
CERTBOT_LOCK_FILE = "certbot-locks.json"


@dataclass
class Cluster:
    """a node's state store, the certbot's key-value space and lock, and (with etcd) the
    tasks that keep the node in step with the others."""

    store: StateStore
    kv: KeyValue
    lock: DomainLock
    sync: SyncSettings = field(default_factory=SyncSettings)
    client: EtcdClient | None = None
    connections: NodeValues | None = None
    handshakes: NodeValues | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.client is not None

    @property
    def global_connections(self) -> Callable[[], Awaitable[dict[str, dict[int, int]]]] | None:
        """the cluster's connection counts (Admin.GetGlobalConnections), None when alone."""
        return self.connections.read if self.connections is not None else None

    async def attach(self, control: GatewayControl) -> None:
        """announce this node and follow the cluster (nothing for a single node).
        EtcdUnavailable when the announcement cannot be written."""
        if not isinstance(self.store, EtcdStore):
            return
        await control.announce()
        log.info("node %d joined the cluster at %s", control.node.node_id, self.store.prefix)
        self.tasks.append(
            asyncio.ensure_future(self.store.follow(control.sync_state, self.sync.interval))
        )
        self.tasks.append(asyncio.ensure_future(self._push(control)))

    async def _push(self, control: GatewayControl) -> None:
        """every ``sync_connections_interval``: this node's connection counts (when enabled)
        and handshake times into etcd, the cluster's handshake times into the control plane
        (recycling looks at the latest any node saw)."""
        while True:
            table = control.table  # the workers' counts, as they report them
            insts = table.instances()
            try:
                if self.connections is not None:
                    await self.connections.push(
                        {i.instance_id: table.connections(i.instance_id) for i in insts}
                    )
                if self.handshakes is not None:
                    await self.handshakes.push(
                        {i.instance_id: int(control.latest_handshake(i.public_key)) for i in insts}
                    )
                    control.cluster_handshakes = await self.handshakes.read()
            except EtcdError as e:
                log.debug("connection counts and handshakes not pushed: %s", e)
            await asyncio.sleep(self.sync.sync_connections_interval)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
        for values in (self.connections, self.handshakes):
            if values is not None:
                with contextlib.suppress(EtcdError, TimeoutError):
                    await asyncio.wait_for(values.close(), 2.0)
        if self.client is not None:
            await self.client.close()


async def build_cluster(cfg: GatewayConfig) -> Cluster:
    """the node's stores from ``[core.sync]``; see the module doc. ConfigError for unreadable
    etcd TLS files, UnavailableError when etcd does not answer or holds a malformed record."""
    s = cfg.sync
    if not s.enabled:
        return Cluster(
            store=LocalFileStore(s.data_dir),
            kv=FileKv(s.data_dir / CERTBOT_KV_FILE),
            lock=FileDomainLock(s.data_dir / CERTBOT_LOCK_FILE),
            sync=s,
        )
    tls = None
    if s.etcd_ca_cert or s.etcd_cert:
        tls = EtcdTls(s.etcd_ca_cert, s.etcd_cert, s.etcd_key)
    client = EtcdClient(s.etcd_endpoints, timeout=s.timeout, tls=tls)
    store = EtcdStore(client, s.etcd_prefix)
    try:
        await store.open()
    except EtcdUnavailable as e:
        await client.close()
        raise UnavailableError(f"cannot start the cluster node: {e}") from None
    except EtcdError as e:
        await client.close()
        raise UnavailableError(f"cannot start the cluster node: etcd: {e}") from None
    ttl = 3 * s.sync_connections_interval
    conns = None
    if s.sync_connections_enabled:
        conns = connection_counts(client, s.etcd_prefix, s.node_id, ttl)
    log.info("cluster state in etcd (%d endpoints) under %s", len(s.etcd_endpoints), store.prefix)
    return Cluster(
        store=store,
        kv=EtcdKv(client, s.etcd_prefix),
        lock=EtcdDomainLock(client, s.etcd_prefix),
        sync=s,
        client=client,
        connections=conns,
        handshakes=handshake_times(client, s.etcd_prefix, s.node_id, ttl),
    )
