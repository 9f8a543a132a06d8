"""the route table: what the control plane fills and the relay reads (sans-I/O, one process).

The control plane (RegisterCvm, the admin service, state persistence, the WireGuard handshake
poller) calls:

* :meth:`RouteTable.upsert` / :meth:`RouteTable.remove` for instances (refusing an instance id
  claimed by another app and a WireGuard key used by another instance);
* :meth:`RouteTable.set_reported_policy` / :meth:`RouteTable.set_admin_policy` for port policies;
* :meth:`RouteTable.set_handshakes` with ``wg show <if> latest-handshakes`` (public key → unix
  seconds, 0 for never) every few seconds; the relay never runs ``wg``;
* :attr:`RouteTable.on_policy_missing`: called with an instance id when a connection is refused
  because its policy is unknown (the control plane fetches it, de-duplicated, and sets it).

The relay calls :meth:`RouteTable.resolve` (instance id first, then app id, §2.3/§2.5), which
returns the candidates with their pp flags after the fail-closed port policy and the per-app
connection limit, and :meth:`RouteTable.conn_opened` / :meth:`RouteTable.conn_closed` around a
live connection. Refusals are :class:`RouteError` (a :class:`~pydstack.errors.DstackError`)
with upstream's messages.

The invariant the property test checks: :meth:`resolve` of an id returns either the one instance
with that instance id or instances whose app id is that id, never another app's.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from pydstack.errors import DstackError, InputError

from .policy import PolicySource, PortPolicy, Verdict, check_port, effective_policy


class RouteError(DstackError):
    """a connection cannot be routed (unknown id, no healthy instance, policy, limit)."""


class RouteConflictError(InputError):
    """an instance update conflicts with what the table holds (another app's instance id, a
    WireGuard key in use by another instance)."""


@dataclass(frozen=True, slots=True)
class Instance:
    """one registered CVM instance as the data plane sees it."""

    instance_id: str
    app_id: str
    #: the instance's WireGuard address (the backend host)
    ip: str
    #: its WireGuard public key (base64), the key of the handshake map
    public_key: str = ""
    compose_hash: str = ""
    reported_policy: PortPolicy | None = None
    admin_policy: PortPolicy | None = None
    reg_time: float = 0.0

    def policy(self) -> tuple[PortPolicy | None, PolicySource]:
        return effective_policy(self.admin_policy, self.reported_policy)


@dataclass(frozen=True, slots=True)
class Candidate:
    """a backend to connect to: the instance (None for the debug localhost backend), the host,
    and whether a PROXY v2 header goes first."""

    instance: Instance | None
    host: str
    pp: bool


@dataclass(frozen=True, slots=True)
class RouteSettings:
    """the [core.proxy] knobs the table uses (seconds)."""

    connect_top_n: int = 3
    cache_top_n: float = 30.0
    handshake_stale: float = 1800.0
    max_connections_per_app: int = 2000


class RouteTable:
    """instances, handshake ages, the top-N cache and connection counters of one process."""

    def __init__(
        self,
        settings: RouteSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings or RouteSettings()
        self._clock = clock
        self._wall = wall_clock
        self._rng = rng or random.Random()
        self._instances: dict[str, Instance] = {}
        self._by_app: dict[str, set[str]] = {}
        self._by_key: dict[str, str] = {}
        self._handshakes: dict[str, float] | None = None
        self._top_n: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._live: dict[str, int] = {}
        #: connections other worker processes hold, per instance (fed by the supervisor)
        self.remote_counts: dict[str, int] = {}
        self.on_policy_missing: Callable[[str], None] | None = None
        #: bumped on every change, so a supervisor can tell when to publish a snapshot
        self.version = 0

    # --- control plane side -------------------------------------------------------------

    def upsert(self, inst: Instance) -> None:
        """add or replace an instance. RouteConflictError (nothing changes) when its id is
        registered to another app or its public key belongs to another instance."""
        if not inst.instance_id or not inst.app_id:
            raise RouteConflictError("app id and instance id must not be empty")
        old = self._instances.get(inst.instance_id)
        if old is not None and old.app_id != inst.app_id:
            raise RouteConflictError("instance id is registered to another app")
        if inst.public_key:
            owner = self._by_key.get(inst.public_key)
            if owner is not None and owner != inst.instance_id:
                raise RouteConflictError("wireguard public key is used by another instance")
        if old is not None and old.public_key and old.public_key != inst.public_key:
            self._by_key.pop(old.public_key, None)
        self._instances[inst.instance_id] = inst
        self._by_app.setdefault(inst.app_id, set()).add(inst.instance_id)
        if inst.public_key:
            self._by_key[inst.public_key] = inst.instance_id
        if old is None or old.ip != inst.ip or old.public_key != inst.public_key:
            self._top_n.pop(inst.app_id, None)
        self.version += 1

    def remove(self, instance_id: str) -> Instance | None:
        inst = self._instances.pop(instance_id, None)
        if inst is None:
            return None
        ids = self._by_app.get(inst.app_id)
        if ids is not None:
            ids.discard(instance_id)
            if not ids:
                del self._by_app[inst.app_id]
        if inst.public_key and self._by_key.get(inst.public_key) == instance_id:
            del self._by_key[inst.public_key]
        self._top_n.pop(inst.app_id, None)
        self.version += 1
        return inst

    def get(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    def instances(self) -> list[Instance]:
        return list(self._instances.values())

    def set_reported_policy(self, instance_id: str, policy: PortPolicy | None) -> None:
        self._update(instance_id, reported_policy=policy)

    def set_admin_policy(self, instance_id: str, policy: PortPolicy | None) -> None:
        self._update(instance_id, admin_policy=policy)

    def _update(self, instance_id: str, **changes: Any) -> None:
        inst = self._instances.get(instance_id)
        if inst is None:
            raise RouteError("instance not found")
        self._instances[instance_id] = replace(inst, **changes)
        self.version += 1

    def set_handshakes(self, handshakes: Mapping[str, float] | None) -> None:
        """the latest WireGuard handshake per public key (unix seconds, 0 = never); None when
        they cannot be read (app routing then picks at random among the app's instances)."""
        self._handshakes = None if handshakes is None else dict(handshakes)
        self.version += 1

    def handshake_age(self, inst: Instance) -> float:
        """seconds since the instance's last handshake; infinity when never or unknown."""
        if self._handshakes is None:
            return float("inf")
        ts = self._handshakes.get(inst.public_key, 0)
        if ts <= 0:
            return float("inf")
        return max(0.0, self._wall() - ts)

    def connections(self, instance_id: str) -> int:
        """live connections to the instance, this process's and the others' reported ones."""
        return self._live.get(instance_id, 0) + self.remote_counts.get(instance_id, 0)

    def local_counts(self) -> dict[str, int]:
        return {k: v for k, v in self._live.items() if v}

    # --- relay side ---------------------------------------------------------------------

    def conn_opened(self, instance_id: str) -> None:
        self._live[instance_id] = self._live.get(instance_id, 0) + 1

    def conn_closed(self, instance_id: str) -> None:
        n = self._live.get(instance_id, 0) - 1
        if n > 0:
            self._live[instance_id] = n
        else:
            self._live.pop(instance_id, None)

    def candidates(self, target_id: str) -> list[Instance]:
        """the instances an id may reach before policy and limits: the instance with that id
        (no health filter), else the app's top-N healthy ones. RouteError when none."""
        inst = self._instances.get(target_id)
        if inst is not None:
            return [inst]
        ids = self._by_app.get(target_id)
        if not ids:
            raise RouteError("app not found")
        return self._select_app(target_id, ids)

    def _select_app(self, app_id: str, ids: set[str]) -> list[Instance]:
        members = [self._instances[i] for i in ids]
        if self._handshakes is None:
            # handshakes unreadable: upstream falls back to a random pick
            return [self._rng.choice(sorted(members, key=lambda i: i.instance_id))]
        n = self.settings.connect_top_n
        now = self._clock()
        if n > 0:
            cached = self._top_n.get(app_id)
            if cached is not None and cached[1] and now - cached[0] < self.settings.cache_top_n:
                hit = [self._instances[i] for i in cached[1] if i in self._instances]
                if hit:
                    return hit
        stale = self.settings.handshake_stale
        aged = [(self.handshake_age(m), m.instance_id, m) for m in members]
        healthy = [(age, iid, m) for age, iid, m in aged if age < stale]
        if not healthy:
            raise RouteError("no healthy instance of the app")
        if n == 0:
            return [self._rng.choice(sorted(healthy))[2]]
        healthy.sort()
        top = [m for _, _, m in healthy[:n]]
        self._top_n[app_id] = (now, tuple(m.instance_id for m in top))
        return top

    def resolve(self, target_id: str, port: int) -> list[Candidate]:
        """candidates for `target_id:port` after the port policy (fail closed; an unknown policy
        also calls :attr:`on_policy_missing`) and the per-app connection limit. RouteError:
        "app not found", "no healthy instance of the app", "port N denied by app port
        policy", "app connection limit exceeded: total/max"."""
        allowed: list[Candidate] = []
        for inst in self.candidates(target_id):
            policy, _ = inst.policy()
            verdict = check_port(policy, port)
            if verdict is Verdict.ALLOW:
                assert policy is not None
                allowed.append(Candidate(inst, inst.ip, policy.pp(port)))
            elif verdict is Verdict.UNKNOWN and self.on_policy_missing is not None:
                self.on_policy_missing(inst.instance_id)
        if not allowed:
            raise RouteError(f"port {port} denied by app port policy")
        limit = self.settings.max_connections_per_app
        if limit > 0:
            total = sum(self.connections(c.instance.instance_id) for c in allowed if c.instance)
            if total >= limit:
                raise RouteError(f"app connection limit exceeded: {total}/{limit}")
        return allowed

    # --- snapshots (the supervisor copies the table into worker processes) --------------

    def snapshot(self) -> dict[str, Any]:
        """the table as JSON-able data (instances and handshakes; not counters or caches)."""

        def pol(p: PortPolicy | None) -> dict[str, Any] | None:
            return None if p is None else p.to_json()

        return {
            "instances": [
                {
                    "instance_id": i.instance_id,
                    "app_id": i.app_id,
                    "ip": i.ip,
                    "public_key": i.public_key,
                    "compose_hash": i.compose_hash,
                    "reported_policy": pol(i.reported_policy),
                    "admin_policy": pol(i.admin_policy),
                    "reg_time": i.reg_time,
                }
                for i in self._instances.values()
            ],
            "handshakes": self._handshakes,
        }

    def load_snapshot(self, snap: Mapping[str, Any]) -> None:
        """replace instances and handshakes with a :meth:`snapshot` (counters are kept; the
        top-N cache of an app is dropped when its members changed)."""

        def pol(p: Any) -> PortPolicy | None:
            return None if p is None else PortPolicy.from_json(p)

        new: dict[str, Instance] = {}
        for d in snap.get("instances", []):
            inst = Instance(
                instance_id=str(d["instance_id"]),
                app_id=str(d["app_id"]),
                ip=str(d["ip"]),
                public_key=str(d.get("public_key", "")),
                compose_hash=str(d.get("compose_hash", "")),
                reported_policy=pol(d.get("reported_policy")),
                admin_policy=pol(d.get("admin_policy")),
                reg_time=float(d.get("reg_time", 0.0)),
            )
            new[inst.instance_id] = inst
        changed_apps = {
            i.app_id
            for iid in set(new) | set(self._instances)
            for i in (new.get(iid), self._instances.get(iid))
            if i is not None and new.get(iid) != self._instances.get(iid)
        }
        by_app: dict[str, set[str]] = {}
        for inst in new.values():
            by_app.setdefault(inst.app_id, set()).add(inst.instance_id)
        self._instances = new
        self._by_app = by_app
        self._by_key = {i.public_key: i.instance_id for i in new.values() if i.public_key}
        for app in changed_apps:
            self._top_n.pop(app, None)
        hs = snap.get("handshakes")
        self.set_handshakes(None if hs is None else {str(k): float(v) for k, v in hs.items()})
