"""one way to serve the guest agent, for every place that runs it: `dstack-guest-agent` on real
TDX, a sandbox CVM's guest, and `dstack-simulator`.

A :class:`Listener` names an address (`unix:PATH` or `HOST:PORT`), the APIs served there
(`dstack` = DstackGuest, `tappd` = the legacy Tappd, `worker` = the external Worker API with the
dashboard, `/metrics` and `/logs`) and its options (socket permissions, browser rules). A
listener with prpc APIs only runs on the lean :class:`~pydstack.rpc.http1.Http1Server` (the
apps' hot path); one with `worker` on aiohttp (:class:`~pydstack.rpc.server.PrpcServer`).
:func:`start_agent` opens them all or none: a listener that cannot be set up (OSError,
ValueError: a taken port, an unknown group) closes the others and raises.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydstack import __version__
from pydstack.rpc.calls import PrpcService, parse_socket_mode
from pydstack.rpc.guard import RequestGuard
from pydstack.rpc.http1 import Http1Server
from pydstack.rpc.limits import ServerLimits
from pydstack.types.netaddr import parse_port

from .core import GuestCore
from .service import guest_service, tappd_service, worker_service

if TYPE_CHECKING:
    from pydstack.rpc.server import PrpcServer

log = logging.getLogger(__name__)

APIS: Mapping[str, Any] = {
    "dstack": guest_service,
    "tappd": tappd_service,
    "worker": worker_service,
}
RESPONSE_HEADERS = {"X-App-Version": __version__}


@dataclass(frozen=True)
class ListenerOptions:
    """one listener's socket permissions and browser rules."""

    socket_mode: int = 0o660
    socket_group: str | int | None = None
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()

    def guard(self, section: str) -> RequestGuard:
        return RequestGuard.from_config(
            list(self.allowed_hosts),
            list(self.allowed_origins),
            hosts_key=f"[{section}] allowed_hosts",
            origins_key=f"[{section}] allowed_origins",
        )

    @classmethod
    def from_table(cls, section: str, table: Mapping[str, Any]) -> ListenerOptions:
        """ValueError naming the section for a bad value."""
        try:
            mode = parse_socket_mode(table.get("socket_mode", "0660"))
            group = table.get("socket_group")
            if group is not None and not isinstance(group, str | int):
                raise ValueError("socket_group must be a group name or gid")
            RequestGuard.from_config(table.get("allowed_hosts"), table.get("allowed_origins"))
        except (ValueError, TypeError) as e:
            raise ValueError(f"agent config [{section}]: {e}") from e
        return cls(
            socket_mode=mode,
            socket_group=None if group is None else str(group),
            allowed_hosts=tuple(table.get("allowed_hosts") or ()),
            allowed_origins=tuple(table.get("allowed_origins") or ()),
        )


@dataclass(frozen=True)
class Listener:
    address: str
    apis: tuple[str, ...]
    options: ListenerOptions = field(default_factory=ListenerOptions)
    #: the config section the options came from (names the keys in refusals)
    section: str = "listener"

    def __post_init__(self) -> None:
        unknown = [a for a in self.apis if a not in APIS]
        if unknown or not self.apis:
            raise ValueError(f"unknown agent apis {unknown or self.apis!r}")


class AgentServers:
    """the running listeners; `endpoints` maps each listener's section to where it listens."""

    def __init__(self) -> None:
        self.servers: list[PrpcServer | Http1Server] = []
        self.endpoints: dict[str, str] = {}

    async def close(self) -> None:
        for s in self.servers:
            await s.close()
        self.servers.clear()


async def _listen(server: PrpcServer | Http1Server, listener: Listener) -> str:
    address, options = listener.address, listener.options
    if address.startswith("unix:"):
        await server.listen_unix(address[5:], mode=options.socket_mode, group=options.socket_group)
        return address
    host, _, port = address.rpartition(":")
    number = parse_port(port, allow_zero=True)
    if not host or number is None:
        raise ValueError(f"invalid listen address {address!r}: expected unix:PATH or HOST:PORT")
    bound = await server.listen_tcp(host.strip("[]"), number)
    return f"http://{host}:{bound}"


async def start_agent(
    core: GuestCore,
    listeners: Sequence[Listener],
    *,
    limits: ServerLimits | None = None,
) -> AgentServers:
    """serve `core` on every listener (all of them, or none on an error)."""
    out = AgentServers()
    try:
        for listener in listeners:
            guard = listener.options.guard(listener.section)
            server: PrpcServer | Http1Server
            if "worker" in listener.apis:  # the dashboard and the log stream need aiohttp
                from pydstack.rpc.server import PrpcServer

                from .http_routes import add_routes

                server = PrpcServer(response_headers=RESPONSE_HEADERS, limits=limits, guard=guard)
                add_routes(server.app, core)
            else:  # prpc only: the lean server (the apps' hot path)
                # eager: the agent's handlers answer from memory or wait on a thread, never
                # on anything that needs a current task
                server = Http1Server(
                    response_headers=RESPONSE_HEADERS, limits=limits, guard=guard, eager=True
                )
            out.servers.append(server)
            for api in listener.apis:
                service: PrpcService = APIS[api](core)
                server.mount(service)
            where = await _listen(server, listener)
            out.endpoints[listener.section] = where
            log.info("serving %s on %s", "+".join(listener.apis), where)
    except BaseException:
        await out.close()
        raise
    return out
