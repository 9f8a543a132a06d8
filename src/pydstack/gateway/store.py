"""the gateway's durable state behind one interface: registered instances (app, WireGuard address
and key, registration time, reported and admin port policies) and node statuses.

:class:`StateStore` is what the control plane uses; :class:`LocalFileStore` keeps the state in
one JSON file (``<core.sync.data_dir>/gateway-state.json``, mode 0600 in a 0700 directory,
replaced atomically: a crash leaves the old or the new state, never a mix). A cluster store (etcd)
implements the same Protocol (:class:`~.etcdstore.EtcdStore`): every change is a
:meth:`StateStore.transact` of a function over the whole state, which maps onto an etcd
transaction (read the keys with their revisions, compare them unchanged, write) retried on
conflict, so IP allocation stays first-free and unique across the nodes.

A state file that cannot be read or parsed is a :class:`~pydstack.errors.ConfigError` naming the
file (the gateway refuses to start rather than forget its instances).
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydstack.errors import ConfigError
from pydstack.types.capped import read_capped
from pydstack.types.jsonlimits import load_object

from .policy import PortPolicy, PortPolicyError

T = TypeVar("T")

STATE_FILE = "gateway-state.json"
STATE_VERSION = 1
#: the most bytes of state read (about 100k instances)
MAX_STATE_BYTES = 64 << 20
NODE_UP, NODE_DOWN = "up", "down"


@dataclass(frozen=True)
class InstanceRecord:
    """one registered instance as stored (upstream's ``inst/<id>``)."""

    instance_id: str
    app_id: str
    ip: str
    public_key: str
    reg_time: float
    compose_hash: str = ""
    port_policy: PortPolicy | None = None
    #: the compose hash `port_policy` was reported or fetched under
    port_policy_hash: str = ""
    admin_port_policy: PortPolicy | None = None

    def to_json(self) -> dict[str, Any]:
        def pol(p: PortPolicy | None) -> dict[str, Any] | None:
            return None if p is None else p.to_json()

        return {
            "app_id": self.app_id,
            "ip": self.ip,
            "public_key": self.public_key,
            "reg_time": self.reg_time,
            "compose_hash": self.compose_hash,
            "port_policy": pol(self.port_policy),
            "port_policy_hash": self.port_policy_hash,
            "admin_port_policy": pol(self.admin_port_policy),
        }

    @classmethod
    def from_json(cls, instance_id: str, obj: Mapping[str, Any]) -> InstanceRecord:
        """ValueError/TypeError/KeyError/PortPolicyError for a foreign shape."""

        def pol(v: Any) -> PortPolicy | None:
            return None if v is None else PortPolicy.from_json(v)

        def text(key: str) -> str:
            v = obj.get(key, "")
            if not isinstance(v, str):
                raise TypeError(f"{key} must be a string")
            return v

        reg = obj.get("reg_time", 0)
        if isinstance(reg, bool) or not isinstance(reg, int | float):
            raise TypeError("reg_time must be a number")
        return cls(
            instance_id=instance_id,
            app_id=text("app_id"),
            ip=text("ip"),
            public_key=text("public_key"),
            reg_time=float(reg),
            compose_hash=text("compose_hash"),
            port_policy=pol(obj.get("port_policy")),
            port_policy_hash=text("port_policy_hash"),
            admin_port_policy=pol(obj.get("admin_port_policy")),
        )


@dataclass(frozen=True)
class NodeInfo:
    """one gateway node of a cluster as it announces itself (upstream's ``node/info/<id>``)."""

    node_id: int
    url: str
    wg_public_key: str
    wg_endpoint: str
    wg_ip: str
    uuid: bytes = b""

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "wg_public_key": self.wg_public_key,
            "wg_endpoint": self.wg_endpoint,
            "wg_ip": self.wg_ip,
            "uuid": self.uuid.hex(),
        }

    @classmethod
    def from_json(cls, node_id: int, obj: Mapping[str, Any]) -> NodeInfo:
        """ValueError/TypeError for a foreign shape."""
        fields = {}
        for key in ("url", "wg_public_key", "wg_endpoint", "wg_ip", "uuid"):
            v = obj.get(key, "")
            if not isinstance(v, str):
                raise TypeError(f"node {node_id} {key} must be a string")
            fields[key] = v
        uuid = bytes.fromhex(fields.pop("uuid"))
        return cls(node_id=node_id, uuid=uuid, **fields)


@dataclass
class GatewayState:
    """everything the store keeps; :meth:`StateStore.transact` hands out a copy to change."""

    instances: dict[str, InstanceRecord] = field(default_factory=dict)
    #: node id → "up" / "down" (a node without an entry is up)
    node_status: dict[int, str] = field(default_factory=dict)
    #: the nodes of a cluster (empty for a single node)
    nodes: dict[int, NodeInfo] = field(default_factory=dict)

    def allocated(self) -> set[str]:
        return {i.ip for i in self.instances.values()}

    def key_owner(self, public_key: str) -> str | None:
        for inst in self.instances.values():
            if inst.public_key == public_key:
                return inst.instance_id
        return None

    def status_of(self, node_id: int) -> str:
        return self.node_status.get(node_id, NODE_UP)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": STATE_VERSION,
            "instances": {k: v.to_json() for k, v in sorted(self.instances.items())},
            "node_status": {str(k): v for k, v in sorted(self.node_status.items())},
        }
        if self.nodes:
            out["nodes"] = {str(k): v.to_json() for k, v in sorted(self.nodes.items())}
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> GatewayState:
        """ValueError (or its kin) for a foreign shape."""
        if obj.get("version") != STATE_VERSION:
            raise ValueError(f"unknown state version {obj.get('version')!r}")
        raw = obj.get("instances", {})
        nodes = obj.get("node_status", {})
        infos = obj.get("nodes", {})
        if not all(isinstance(x, Mapping) for x in (raw, nodes, infos)):
            raise ValueError("instances, node_status and nodes must be objects")
        state = cls()
        for iid, rec in raw.items():
            if not isinstance(rec, Mapping):
                raise ValueError(f"instance {str(iid)[:64]} is not an object")
            state.instances[str(iid)] = InstanceRecord.from_json(str(iid), rec)
        for node, status in nodes.items():
            if status not in (NODE_UP, NODE_DOWN):
                raise ValueError(f"node status {str(status)[:16]!r} is not up or down")
            state.node_status[int(node)] = status
        for node, info in infos.items():
            if not isinstance(info, Mapping):
                raise ValueError(f"node {str(node)[:16]} is not an object")
            state.nodes[int(node)] = NodeInfo.from_json(int(node), info)
        return state


class StateStore(Protocol):
    """durable gateway state (a local file, or a cluster's shared store)."""

    def load(self) -> GatewayState:
        """the current state (a copy the caller may keep)."""
        ...

    async def transact(self, fn: Callable[[GatewayState], T]) -> T:
        """apply `fn` to a copy of the current state and commit the copy atomically; `fn`'s
        exception aborts (nothing changes) and propagates. `fn` may run more than once (a
        cluster store retries on conflict), so it must only read and change its argument."""
        ...


class LocalFileStore:
    """the state in ``<data_dir>/gateway-state.json``; one process owns it."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        self.path = data_dir / STATE_FILE
        self._lock = asyncio.Lock()
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self._state = self._read()

    def _read(self) -> GatewayState:
        try:
            with open(self.path, "rb") as f:
                data = read_capped(f, MAX_STATE_BYTES)
        except FileNotFoundError:
            return GatewayState()
        except OSError as e:
            raise ConfigError(f"cannot read the gateway state {self.path}: {e.strerror}") from e
        try:
            obj = load_object(data, "gateway state", max_bytes=MAX_STATE_BYTES, error=ConfigError)
            return GatewayState.from_json(obj)
        except ConfigError as e:
            raise ConfigError(f"the gateway state {self.path} is unreadable: {e}") from None
        except (ValueError, TypeError, KeyError, PortPolicyError) as e:
            raise ConfigError(f"the gateway state {self.path} is malformed: {e}") from None

    def load(self) -> GatewayState:
        return copy.deepcopy(self._state)

    async def transact(self, fn: Callable[[GatewayState], T]) -> T:
        async with self._lock:
            work = copy.deepcopy(self._state)
            result = fn(work)
            if work != self._state:
                text = json.dumps(work.to_json(), separators=(",", ":"))
                await asyncio.to_thread(_write_atomic, self.path, text)
                self._state = work
            return result


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def with_policy(
    rec: InstanceRecord, policy: PortPolicy | None, compose_hash: str
) -> InstanceRecord:
    """the record with `policy` reported under `compose_hash`."""
    return replace(rec, port_policy=policy, port_policy_hash=compose_hash if policy else "")
