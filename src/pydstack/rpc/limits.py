"""connection limits for every HTTP server: a connection cap and timeouts for slow clients.

:class:`ServerLimits` is what a config sets; :class:`ConnectionTable` counts one server's
connections against its cap. The servers enforce them: :mod:`pydstack.rpc.http1` (the lean
server) and :mod:`pydstack.rpc.aiolimits` (aiohttp's sites). This module imports no HTTP
stack, so a process that only serves through http1 (the guest agent) never loads aiohttp's
server.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: file descriptors kept free for everything else when capping connections (logs, vm processes)
FD_RESERVE = 256


@dataclass(frozen=True)
class ServerLimits:
    """one server's connection cap and timeouts (seconds); ValueError for out-of-range values.

    The defaults suit a management API on a host: 1024 connections, 10 s for a TLS handshake and
    for request headers, 30 s for a body and for an idle keep-alive connection.
    """

    max_connections: int = 1024
    tls_handshake_timeout: float = 10.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.max_connections, bool) or not isinstance(self.max_connections, int):
            raise ValueError("max_connections must be an integer")
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        for name in ("tls_handshake_timeout", "header_timeout", "body_timeout", "idle_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number of seconds")
            if value < 0 or (value == 0 and name != "idle_timeout") or value > 86400:
                raise ValueError(f"{name} must be between 0 and 86400 seconds (exclusive of 0)")

    @classmethod
    def from_table(
        cls, table: Mapping[str, Any] | None, *, where: str, keep_alive: object = None
    ) -> ServerLimits:
        """from a `[server_limits]` TOML table (unknown keys refused) and upstream's Rocket
        `keep_alive` (seconds; the idle timeout unless the table sets `idle_timeout`).
        ValueError names `where` (the table's path in the config) and the key."""
        table = dict(table or {})
        known = {f.name for f in fields(cls)}
        for key in table:
            if key not in known:
                raise ValueError(f"unknown key {where}.{key} (known: {', '.join(sorted(known))})")
        if keep_alive is not None and "idle_timeout" not in table:
            table["idle_timeout"] = keep_alive
        try:
            return cls(**table)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e


def raise_nofile_limit() -> int:
    """raise this process's RLIMIT_NOFILE soft limit to its hard limit; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_cap(max_connections: int, nofile: int) -> int:
    """`max_connections`, lowered to keep it well under the open-file limit `nofile`."""
    ceiling = max(16, (nofile - FD_RESERVE) // 2)
    if max_connections > ceiling:
        log.warning(
            "max_connections %d lowered to %d: the open-file limit is %d",
            max_connections,
            ceiling,
            nofile,
        )
        return ceiling
    return max_connections


class Tracked(Protocol):
    """a connection the table can count, evict and close."""

    phase: str
    waiting_since: float

    @property
    def evictable(self) -> bool: ...

    def abort(self, why: str) -> None: ...


class ConnectionTable:
    """the open connections of one server and its cap."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._live: dict[Tracked, None] = {}
        #: the highest number of connections open at once (for tests and diagnostics)
        self.peak = 0

    def __len__(self) -> int:
        return len(self._live)

    def admit(self, conn: Tracked) -> bool:
        if len(self._live) >= self.cap:
            waiting = [c for c in self._live if c.evictable]
            if not waiting:
                return False
            min(waiting, key=lambda c: c.waiting_since).abort("evicted at the connection cap")
        self._live[conn] = None
        self.peak = max(self.peak, len(self._live))
        return True

    def forget(self, conn: Tracked) -> None:
        self._live.pop(conn, None)

    def live(self) -> list[Tracked]:
        """the open connections (a copy)."""
        return list(self._live)

    def abort_all(self, why: str) -> None:
        for conn in list(self._live):
            conn.abort(why)

    def abort_unstarted(self) -> None:
        """close connections aiohttp does not know yet (in the TLS handshake)."""
        for conn in list(self._live):
            if conn.phase == "handshake":
                conn.abort("server stopping")
