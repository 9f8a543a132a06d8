"""sans-I/O port policy: which backend ports of an instance the gateway may connect to, and which
of them want a PROXY protocol header.

A policy is ``{restrict_mode, ports: [{port, pp}]}`` (app-compose ``port_policy`` and
``RegisterCvm.port_policy``). ``restrict_mode=false`` allows every port; otherwise only the listed
ones. ``pp`` is read from the list whatever the mode. The effective policy of an instance is the
admin override when set, else the one the instance reported; with neither the instance is
**denied** (fail closed) and the caller queues a fetch from the instance's agent.

Parsing raises :class:`PortPolicyError` (an :class:`~pydstack.errors.InputError`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydstack.errors import InputError, show_value
from pydstack.types import jsonlimits

#: the most ports one policy may list (a bound on what a CVM can make the gateway store)
MAX_PORTS = 1024


class PortPolicyError(InputError):
    """a port policy is malformed."""


@dataclass(frozen=True, slots=True)
class PortPolicy:
    """an instance's port policy; `ports` maps a port to its pp flag."""

    restrict_mode: bool
    ports: Mapping[int, bool]

    def __post_init__(self) -> None:
        if len(self.ports) > MAX_PORTS:
            raise PortPolicyError(f"port policy lists more than {MAX_PORTS} ports")
        for port in self.ports:
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise PortPolicyError(f"port policy port {show_value(port)} is not in 1..65535")
        object.__setattr__(self, "ports", dict(self.ports))

    def __hash__(self) -> int:
        return hash((self.restrict_mode, tuple(sorted(self.ports.items()))))

    def allows(self, port: int) -> bool:
        return not self.restrict_mode or port in self.ports

    def pp(self, port: int) -> bool:
        return self.ports.get(port, False)

    @classmethod
    def from_entries(cls, restrict_mode: bool, entries: Iterable[tuple[int, bool]]) -> PortPolicy:
        ports: dict[int, bool] = {}
        for port, pp in entries:
            ports[port] = ports.get(port, False) or pp
            if len(ports) > MAX_PORTS:
                raise PortPolicyError(f"port policy lists more than {MAX_PORTS} ports")
        return cls(restrict_mode=restrict_mode, ports=ports)

    @classmethod
    def from_json(cls, obj: Any) -> PortPolicy:
        """from the JSON shape ``{"restrict_mode": bool, "ports": [{"port": n, "pp": bool}]}``
        (missing fields default to false and empty, as prpc's serde defaults do)."""
        if not isinstance(obj, Mapping):
            raise PortPolicyError("port policy must be an object")
        restrict = obj.get("restrict_mode", False)
        if not isinstance(restrict, bool):
            raise PortPolicyError("port policy restrict_mode must be a boolean")
        raw_ports = obj.get("ports", [])
        if raw_ports is None:
            raw_ports = []
        if not isinstance(raw_ports, list):
            raise PortPolicyError("port policy ports must be a list")
        if len(raw_ports) > MAX_PORTS:
            raise PortPolicyError(f"port policy lists more than {MAX_PORTS} ports")
        entries: list[tuple[int, bool]] = []
        for item in raw_ports:
            if not isinstance(item, Mapping):
                raise PortPolicyError("port policy entry must be an object")
            port = item.get("port")
            pp = item.get("pp", False)
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise PortPolicyError(f"port policy port {show_value(port)} is not in 1..65535")
            if not isinstance(pp, bool):
                raise PortPolicyError("port policy pp must be a boolean")
            entries.append((port, pp))
        return cls.from_entries(restrict, entries)

    def to_json(self) -> dict[str, Any]:
        return {
            "restrict_mode": self.restrict_mode,
            "ports": [{"port": p, "pp": pp} for p, pp in sorted(self.ports.items())],
        }


#: the policy of a legacy CVM whose agent reports no tcb_info (upstream: open)
OPEN_POLICY = PortPolicy(restrict_mode=False, ports={})


def policy_from_agent_info(info: Mapping[str, Any]) -> PortPolicy:
    """the policy in a guest agent ``Info`` answer: ``tcb_info`` (JSON text) →
    ``app_compose`` (JSON text) → ``port_policy``. An empty ``tcb_info`` is a legacy CVM: the
    open policy; an app compose without ``port_policy`` is open too. PortPolicyError for
    anything malformed (a permanent failure: the fetch is not retried)."""
    tcb_text = info.get("tcb_info", "")
    if tcb_text in ("", None):
        return OPEN_POLICY
    if not isinstance(tcb_text, str):
        raise PortPolicyError("agent info tcb_info is not a string")
    tcb = _json_object(tcb_text, "tcb_info")
    compose = tcb.get("app_compose", "")
    if isinstance(compose, str):
        compose = _json_object(compose, "app_compose") if compose else {}
    if not isinstance(compose, Mapping):
        raise PortPolicyError("agent info app_compose is not an object")
    policy = compose.get("port_policy")
    if policy is None:
        return OPEN_POLICY
    return PortPolicy.from_json(policy)


def _json_object(text: str, what: str) -> Mapping[str, Any]:
    if len(text) > 1 << 20:
        raise PortPolicyError(f"agent info {what} is too large")
    try:
        value = jsonlimits.loads(text)
    except ValueError as e:
        raise PortPolicyError(f"agent info {what} is not json") from e
    if not isinstance(value, Mapping):
        raise PortPolicyError(f"agent info {what} is not an object")
    return value


class PolicySource(enum.Enum):
    ADMIN = "admin"
    INSTANCE = "instance"
    NONE = "none"


def effective_policy(
    admin: PortPolicy | None, reported: PortPolicy | None
) -> tuple[PortPolicy | None, PolicySource]:
    """the admin override wins over the reported policy; neither is (None, NONE)."""
    if admin is not None:
        return admin, PolicySource.ADMIN
    if reported is not None:
        return reported, PolicySource.INSTANCE
    return None, PolicySource.NONE


class Verdict(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    #: no policy known: denied, and the caller should fetch one
    UNKNOWN = "unknown"


def check_port(policy: PortPolicy | None, port: int) -> Verdict:
    """fail closed: no policy is UNKNOWN (a denial), a restricted unlisted port is DENY."""
    if policy is None:
        return Verdict.UNKNOWN
    return Verdict.ALLOW if policy.allows(port) else Verdict.DENY
