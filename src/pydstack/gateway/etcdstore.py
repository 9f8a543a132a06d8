"""the gateway cluster's shared state in etcd, under one prefix ``P`` (``core.sync.etcd_prefix``):

* :class:`EtcdStore` (a :class:`~.store.StateStore`): ``P/inst/<instance_id>`` (the instance as
  JSON), ``P/node/info/<node_id>`` (url, WireGuard key, endpoint and address, uuid),
  ``P/node/status/<node_id>`` (``up``/``down``), and ``P/state/seq``, bumped by every change.
  :meth:`EtcdStore.transact` reads those keys in one transaction (one revision), applies the
  function to a copy, and commits the difference in a transaction that compares ``P/state/seq``
  unchanged since the read; on a conflict it reads again and re-applies, at most
  ``max_retries`` times (then :class:`EtcdConflict`). Two nodes therefore never hand out the
  same address. :meth:`EtcdStore.load` is the last state seen (kept by :meth:`EtcdStore.follow`,
  a watch on ``P/state/seq`` with a periodic re-read), so routing goes on while etcd is away;
  a change while etcd is away raises :class:`~.etcd.EtcdUnavailable` and changes nothing.
* :class:`EtcdKv` (the certbot's :class:`~pydstack.certbot.storage.KeyValue`): ``P/<key>``
  under upstream's key names (``global/...``, ``dns_cred/...``, ``cert/...``); keys of the
  gateway's own state are refused.
* :class:`EtcdDomainLock` (the certbot's :class:`~pydstack.certbot.lock.DomainLock`):
  ``P/lock/<name>`` holding the holder's token, put only if absent, on a lease of the lock's ttl:
  a holder that dies loses the lock when the lease runs out.
* :class:`NodeValues`: ``P/conn/<instance_id>/<node_id>`` (each node's open connections) and
  ``P/handshake/<instance_id>/<node_id>`` (each node's latest handshake with the instance), on
  a lease of the node's own, so a dead node's values vanish.

A record that does not decode is an :class:`~.etcd.EtcdError` naming its key: the store refuses
to start (or to change anything) rather than drop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from pydstack.certbot.lock import LockInfo
from pydstack.types.jsonlimits import load_object

from .etcd import (
    MAX_TXN_OPS,
    MAX_VALUE_BYTES,
    EtcdClient,
    EtcdError,
    cmp_mod_revision,
    op_delete,
    op_put,
    op_range,
    prefix_end,
)
from .policy import PortPolicyError
from .store import NODE_DOWN, NODE_UP, GatewayState, InstanceRecord, NodeInfo

T = TypeVar("T")
log = logging.getLogger(__name__)

#: how many times a conflicting transaction is re-applied before giving up
MAX_RETRIES = 32
#: the longest key suffix (an instance id, a node id, a certbot key) accepted
MAX_KEY_SUFFIX = 512
#: the gateway's own key spaces under the prefix (the certbot's KeyValue may not touch them)
RESERVED = ("inst/", "node/", "state/", "conn/", "handshake/", "lock/")


class EtcdConflict(EtcdError):
    """a transaction kept conflicting with other nodes' changes."""


def check_prefix(prefix: str, key: str = "core.sync.etcd_prefix") -> str:
    """`prefix` without a trailing slash; ValueError naming `key` unless it starts with "/"
    and holds no whitespace or control characters."""
    p = prefix.rstrip("/")
    if not p.startswith("/") or any(c.isspace() or ord(c) < 0x20 for c in p) or len(p) > 256:
        raise ValueError(f'{key} must start with "/" and hold no spaces (at most 256 characters)')
    return p


class EtcdStore:
    """:class:`~.store.StateStore` over etcd; see the module doc."""

    def __init__(self, client: EtcdClient, prefix: str, *, max_retries: int = MAX_RETRIES) -> None:
        self.client = client
        self.prefix = check_prefix(prefix)
        self.max_retries = max_retries
        self._inst = f"{self.prefix}/inst/".encode()
        self._node = f"{self.prefix}/node/".encode()
        self._seq = f"{self.prefix}/state/seq".encode()
        self._state = GatewayState()
        self._rev = 0

    # ------------------------------------------------------------------ keys
    def inst_key(self, instance_id: str) -> bytes:
        return self._inst + _suffix(instance_id)

    def info_key(self, node_id: int) -> bytes:
        return self._node + f"info/{node_id}".encode()

    def status_key(self, node_id: int) -> bytes:
        return self._node + f"status/{node_id}".encode()

    # ------------------------------------------------------------------ reading
    async def open(self) -> None:
        """read the state once (EtcdUnavailable when etcd cannot be reached)."""
        state, _, rev = await self._snapshot()
        self._state, self._rev = state, rev

    async def _snapshot(self) -> tuple[GatewayState, int, int]:
        """(state, mod revision of the seq key, store revision), read at one revision."""
        res = await self.client.txn(
            [],
            [
                op_range(self._seq),
                _op_prefix(self._inst),
                _op_prefix(self._node),
            ],
        )
        seq_kvs, inst_kvs, node_kvs = res.ranges
        state = GatewayState()
        for kv in inst_kvs:
            iid = kv.key[len(self._inst) :].decode(errors="replace")
            try:
                state.instances[iid] = InstanceRecord.from_json(iid, _obj(kv.value))
            except (ValueError, TypeError, KeyError, PortPolicyError) as e:
                raise EtcdError(f"the record {_show(kv.key)} is malformed: {e}") from None
        for kv in node_kvs:
            rest = kv.key[len(self._node) :].decode(errors="replace")
            kind, _, num = rest.partition("/")
            try:
                node_id = int(num)
                if kind == "info":
                    state.nodes[node_id] = NodeInfo.from_json(node_id, _obj(kv.value))
                elif kind == "status":
                    status = kv.value.decode()
                    if status not in (NODE_UP, NODE_DOWN):
                        raise ValueError("status is not up or down")
                    state.node_status[node_id] = status
            except (ValueError, TypeError) as e:
                raise EtcdError(f"the record {_show(kv.key)} is malformed: {e}") from None
        seq_rev = seq_kvs[0].mod_revision if seq_kvs else 0
        return state, seq_rev, res.revision

    def load(self) -> GatewayState:
        return copy.deepcopy(self._state)

    # ------------------------------------------------------------------ writing
    async def transact(self, fn: Callable[[GatewayState], T]) -> T:
        for attempt in range(self.max_retries):
            state, seq_rev, rev = await self._snapshot()
            work = copy.deepcopy(state)
            result = fn(work)
            if work == state:
                self._accept(state, rev)
                return result
            ops = self._diff(state, work)
            ops.append(op_put(self._seq, str(rev).encode()))
            if len(ops) > MAX_TXN_OPS:
                raise EtcdError(
                    f"a change of {len(ops)} keys is more than one etcd transaction takes "
                    f"({MAX_TXN_OPS})"
                )
            res = await self.client.txn([cmp_mod_revision(self._seq, seq_rev)], ops)
            if res.succeeded:
                self._accept(work, res.revision)
                return result
            log.debug("state transaction conflicted (attempt %d); retrying", attempt + 1)
            await asyncio.sleep(random.uniform(0, 0.05 * (attempt + 1)))
        raise EtcdConflict(
            f"the change conflicted with other gateway nodes {self.max_retries} times"
        )

    def _accept(self, state: GatewayState, rev: int) -> None:
        if rev >= self._rev:
            self._state, self._rev = copy.deepcopy(state), rev

    def _diff(self, old: GatewayState, new: GatewayState) -> list[dict[str, Any]]:
        ops: list[dict[str, Any]] = []
        for iid, rec in new.instances.items():
            if old.instances.get(iid) != rec:
                ops.append(op_put(self.inst_key(iid), _dump(rec.to_json())))
        ops += [op_delete(self.inst_key(i)) for i in old.instances if i not in new.instances]
        for nid, info in new.nodes.items():
            if old.nodes.get(nid) != info:
                ops.append(op_put(self.info_key(nid), _dump(info.to_json())))
        ops += [op_delete(self.info_key(n)) for n in old.nodes if n not in new.nodes]
        for nid, status in new.node_status.items():
            if old.node_status.get(nid) != status:
                ops.append(op_put(self.status_key(nid), status.encode()))
        ops += [op_delete(self.status_key(n)) for n in old.node_status if n not in new.node_status]
        return ops

    # ------------------------------------------------------------------ following
    async def refresh(self, on_change: Callable[[GatewayState], Awaitable[None]]) -> int:
        """re-read the state; `on_change` gets it when it differs from what was known. The
        store revision read."""
        state, _, rev = await self._snapshot()
        if rev > self._rev and state != self._state:
            self._state, self._rev = state, rev
            await on_change(copy.deepcopy(state))
        else:
            self._rev = max(self._rev, rev)
        return rev

    async def follow(
        self, on_change: Callable[[GatewayState], Awaitable[None]], interval: float
    ) -> None:
        """forever: watch ``P/state/seq`` and re-read on every change (and at least every
        `interval` seconds); while etcd is away, log once and keep the last state."""
        away = False
        while True:
            try:
                rev = await self.refresh(on_change)
                if away:
                    log.info("etcd is reachable again; following the cluster state")
                    away = False
                async with contextlib.aclosing(
                    self.client.watch(self._seq, start_revision=rev + 1)
                ) as events:
                    while True:
                        try:
                            await asyncio.wait_for(anext(events), interval)
                        except (StopAsyncIteration, TimeoutError):
                            break
                        await self.refresh(on_change)
            except EtcdError as e:
                if not away:
                    log.warning("lost etcd (%s); routing the known instances meanwhile", e)
                    away = True
                await asyncio.sleep(min(1.0, interval))
            except Exception:
                log.exception("following the cluster state failed")
                await asyncio.sleep(interval)


# ---------------------------------------------------------------------- certbot key-value
class EtcdKv:
    """the certbot's KeyValue at ``P/<key>`` (ValueError for a key of the gateway's state)."""

    def __init__(self, client: EtcdClient, prefix: str) -> None:
        self.client = client
        self.prefix = check_prefix(prefix) + "/"

    def _key(self, key: str) -> bytes:
        if key.startswith(RESERVED):
            raise ValueError(f"the key {key[:64]!r} belongs to the gateway's own state")
        return (self.prefix + key).encode()

    async def get(self, key: str) -> str | None:
        kv = await self.client.get(self._key(key))
        return None if kv is None else kv.value.decode(errors="replace")

    async def put(self, key: str, value: str) -> None:
        await self.client.put(self._key(key), value.encode())

    async def delete(self, key: str) -> None:
        await self.client.delete(self._key(key))

    async def list_prefix(self, prefix: str) -> dict[str, str]:
        start = (self.prefix + prefix).encode()
        kvs, _ = await self.client.range(start, prefix_end(start))
        out: dict[str, str] = {}
        for kv in kvs:
            key = kv.key.decode(errors="replace")[len(self.prefix) :]
            if not key.startswith(RESERVED):
                out[key] = kv.value.decode(errors="replace")
        return out


# ---------------------------------------------------------------------- the renewal lock
class EtcdDomainLock:
    """the certbot's DomainLock over etcd: ``P/lock/<name>`` on a lease of the lock's ttl."""

    def __init__(
        self, client: EtcdClient, prefix: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.client = client
        self.base = check_prefix(prefix) + "/lock/"
        self.clock = clock

    def _key(self, name: str) -> bytes:
        return (self.base + name).encode()

    async def _entry(self, name: str) -> tuple[dict[str, Any], int, int] | None:
        kv = await self.client.get(self._key(name))
        if kv is None:
            return None
        try:
            entry = _obj(kv.value)
        except ValueError:
            return None
        if not isinstance(entry.get("token"), str):
            return None
        return entry, kv.mod_revision, kv.lease

    async def acquire(self, name: str, holder: str, ttl: float) -> str | None:
        if not ttl > 0:
            raise ValueError("lock ttl must be positive")
        lease = await self.client.grant(math.ceil(ttl))
        token = secrets.token_hex(16)
        now = self.clock()
        value = {"token": token, "holder": holder, "acquired_at": now, "expires_at": now + ttl}
        key = self._key(name)
        try:
            res = await self.client.txn(
                [cmp_mod_revision(key, 0)], [op_put(key, _dump(value), lease)]
            )
        except BaseException:
            with contextlib.suppress(EtcdError):
                await self.client.revoke(lease)
            raise
        if not res.succeeded:
            await self.client.revoke(lease)
            return None
        return token

    async def refresh(self, name: str, token: str, ttl: float) -> bool:
        cur = await self._entry(name)
        if cur is None or cur[0]["token"] != token:
            return False
        entry, mod, old_lease = cur
        lease = await self.client.grant(math.ceil(ttl))
        entry = {**entry, "expires_at": self.clock() + ttl}
        key = self._key(name)
        res = await self.client.txn(
            [cmp_mod_revision(key, mod)], [op_put(key, _dump(entry), lease)]
        )
        await self.client.revoke(old_lease if res.succeeded else lease)
        return res.succeeded

    async def release(self, name: str, token: str) -> bool:
        cur = await self._entry(name)
        if cur is None or cur[0]["token"] != token:
            return False
        key = self._key(name)
        res = await self.client.txn([cmp_mod_revision(key, cur[1])], [op_delete(key)])
        if res.succeeded and cur[2]:
            await self.client.revoke(cur[2])
        return res.succeeded

    async def force_release(self, name: str) -> bool:
        kv = await self.client.get(self._key(name))
        if kv is None:
            return False
        await self.client.delete(self._key(name))
        if kv.lease:
            await self.client.revoke(kv.lease)
        return True

    async def holder(self, name: str) -> LockInfo | None:
        cur = await self._entry(name)
        if cur is None:
            return None
        e = cur[0]
        try:
            return LockInfo(str(e["holder"]), float(e["acquired_at"]), float(e["expires_at"]))
        except (KeyError, TypeError, ValueError):
            return None


# ---------------------------------------------------------------------- connection counts
class NodeValues:
    """one number per instance for each node at ``P/<space>/<instance>/<node>`` (upstream's
    ``conn/...`` connection counts and ``handshake/...`` handshake times), on a lease of `ttl`
    seconds that :meth:`push` renews: a node that stops pushing loses its values."""

    def __init__(
        self, client: EtcdClient, prefix: str, space: str, node_id: int, ttl: float
    ) -> None:
        self.client = client
        self.base = f"{check_prefix(prefix)}/{space}/"
        self.node_id = node_id
        self.ttl = max(2, math.ceil(ttl))
        self._lease = 0
        self._pushed: dict[str, int] = {}

    async def push(self, values: Mapping[str, int]) -> None:
        """write this node's non-zero values that changed and drop the ones gone (EtcdError
        on failure; a lease that ran out is replaced and everything written again)."""
        if not self._lease or await self.client.keepalive(self._lease) <= 0:
            self._lease = await self.client.grant(self.ttl)
            self._pushed = {}
        live = {iid: n for iid, n in values.items() if n > 0}
        ops: list[dict[str, Any]] = [
            op_put(self._key(iid), str(n).encode(), self._lease)
            for iid, n in live.items()
            if self._pushed.get(iid) != n
        ]
        ops += [op_delete(self._key(iid)) for iid in self._pushed.keys() - live.keys()]
        for i in range(0, len(ops), MAX_TXN_OPS):
            await self.client.txn([], ops[i : i + MAX_TXN_OPS])
        self._pushed = live

    def _key(self, instance_id: str) -> bytes:
        return (self.base + instance_id).encode() + f"/{self.node_id}".encode()

    async def read(self) -> dict[str, dict[int, int]]:
        """instance id → node id → value, over every node."""
        start = self.base.encode()
        kvs, _ = await self.client.range(start, prefix_end(start))
        out: dict[str, dict[int, int]] = {}
        for kv in kvs:
            iid, _, node = kv.key[len(start) :].decode(errors="replace").rpartition("/")
            with contextlib.suppress(ValueError):
                out.setdefault(iid, {})[int(node)] = int(kv.value)
        return out

    async def close(self) -> None:
        if self._lease:
            with contextlib.suppress(EtcdError):
                await self.client.revoke(self._lease)
            self._lease = 0


def connection_counts(client: EtcdClient, prefix: str, node_id: int, ttl: float) -> NodeValues:
    """each node's open connections per instance (``P/conn/<instance>/<node>``)."""
    return NodeValues(client, prefix, "conn", node_id, ttl)


def handshake_times(client: EtcdClient, prefix: str, node_id: int, ttl: float) -> NodeValues:
    """each node's latest WireGuard handshake per instance, unix seconds
    (``P/handshake/<instance>/<node>``)."""
    return NodeValues(client, prefix, "handshake", node_id, ttl)


# ---------------------------------------------------------------------- helpers
def _suffix(text: str) -> bytes:
    raw = text.encode()
    if not raw or len(raw) > MAX_KEY_SUFFIX or "/" in text:
        raise ValueError(f"{text[:64]!r} cannot be part of a key")
    return raw


def _op_prefix(start: bytes) -> dict[str, Any]:
    return op_range(start, prefix_end(start))


def _dump(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _obj(raw: bytes) -> dict[str, Any]:
    """ValueError unless `raw` is a bounded JSON object."""
    return load_object(raw, "the value", max_bytes=MAX_VALUE_BYTES, error=ValueError)


def _show(key: bytes) -> str:
    return key[:120].decode(errors="replace")
