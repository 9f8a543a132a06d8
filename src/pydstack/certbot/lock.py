"""a cluster-wide lock with an expiry: :class:`DomainLock`.

One node renews a domain at a time (upstream's ``cert/<domain>/lock``, taken if absent or
older than 600 s). :meth:`DomainLock.acquire` gives a token when the lock is free or its holder's
time ran out, None while someone else holds it; :meth:`DomainLock.release` needs that token, so
a holder whose lock expired and was taken over cannot release the new holder's. A holder that
dies simply stops refreshing: when `ttl` passes, another node takes the lock.

:class:`MemoryDomainLock` serves one process (tests inject the clock); :class:`FileDomainLock`
serves every process on one machine through one ``flock``-ed JSON file. The gateway's etcd
implementation maps the same contract onto a lease and a transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydstack.types.jsonlimits import load_object

from .errors import CertbotInputError

T = TypeVar("T")
Clock = Callable[[], float]
#: upstream's lock lifetime
DEFAULT_LOCK_TTL = 600.0
MAX_LOCK_FILE = 16 << 20


@dataclass(frozen=True)
class LockInfo:
    """who holds a lock, since when and until when (unix seconds)."""

    holder: str
    acquired_at: float
    expires_at: float


class DomainLock(Protocol):
    async def acquire(self, name: str, holder: str, ttl: float) -> str | None:
        """a token if `name` was free or expired (now held by `holder` for `ttl` seconds), None
        while another holder's lock is live. ValueError for ttl <= 0."""
        ...

    async def refresh(self, name: str, token: str, ttl: float) -> bool:
        """extends the lock `token` holds by `ttl` from now; False if it is no longer held."""
        ...

    async def release(self, name: str, token: str) -> bool:
        """frees `name` if `token` still holds it; False (and nothing changed) otherwise."""
        ...

    async def force_release(self, name: str) -> bool:
        """frees `name` whoever holds it (Admin ForceReleaseCertLock); False if it was free."""
        ...

    async def holder(self, name: str) -> LockInfo | None:
        """the live holder of `name`, None when free or expired."""
        ...


def _entry(obj: Any) -> dict[str, Any] | None:
    if (
        isinstance(obj, dict)
        and isinstance(obj.get("token"), str)
        and isinstance(obj.get("holder"), str)
        and isinstance(obj.get("acquired_at"), int | float)
        and isinstance(obj.get("expires_at"), int | float)
    ):
        return obj
    return None


class _TableLock:
    """the lock logic over a table of entries that a subclass reads and writes atomically."""

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock

    def _transact(self, fn: Callable[[dict[str, Any]], T]) -> T:
        raise NotImplementedError

    async def _run(self, fn: Callable[[dict[str, Any]], T]) -> T:
        return self._transact(fn)

    async def acquire(self, name: str, holder: str, ttl: float) -> str | None:
        if not ttl > 0:
            raise ValueError("lock ttl must be positive")

        def take(table: dict[str, Any]) -> str | None:
            now = self.clock()
            cur = _entry(table.get(name))
            if cur is not None and cur["expires_at"] > now:
                return None
            token = secrets.token_hex(16)
            table[name] = {
                "token": token,
                "holder": holder,
                "acquired_at": now,
                "expires_at": now + ttl,
            }
            return token

        return await self._run(take)

    async def refresh(self, name: str, token: str, ttl: float) -> bool:
        def extend(table: dict[str, Any]) -> bool:
            now = self.clock()
            cur = _entry(table.get(name))
            if cur is None or cur["token"] != token or cur["expires_at"] <= now:
                return False
            cur["expires_at"] = now + ttl
            return True

        return await self._run(extend)

    async def release(self, name: str, token: str) -> bool:
        def free(table: dict[str, Any]) -> bool:
            cur = _entry(table.get(name))
            if cur is None or cur["token"] != token:
                return False
            del table[name]
            return True

        return await self._run(free)

    async def force_release(self, name: str) -> bool:
        return await self._run(lambda table: table.pop(name, None) is not None)

    async def holder(self, name: str) -> LockInfo | None:
        def look(table: dict[str, Any]) -> LockInfo | None:
            cur = _entry(table.get(name))
            if cur is None or cur["expires_at"] <= self.clock():
                return None
            return LockInfo(cur["holder"], float(cur["acquired_at"]), float(cur["expires_at"]))

        return await self._run(look)


class MemoryDomainLock(_TableLock):
    """:class:`DomainLock` for the tasks and threads of one process."""

    def __init__(self, clock: Clock = time.time) -> None:
        super().__init__(clock)
        self._table: dict[str, Any] = {}
        self._mutex = threading.Lock()

    def _transact(self, fn: Callable[[dict[str, Any]], T]) -> T:
        with self._mutex:
            return fn(self._table)


class FileDomainLock(_TableLock):
    """:class:`DomainLock` for the processes of one machine: a JSON table in `path` (mode
    0600), read and rewritten under an exclusive ``flock``. CertbotInputError when the file
    holds something else."""

    def __init__(self, path: Path, clock: Clock = time.time) -> None:
        super().__init__(clock)
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)

    @contextlib.contextmanager
    def _flock(self) -> Iterator[int]:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)

    def _transact(self, fn: Callable[[dict[str, Any]], T]) -> T:
        with self._flock() as fd:
            raw = os.pread(fd, MAX_LOCK_FILE + 1, 0)
            table = (
                load_object(raw, str(self.path), max_bytes=MAX_LOCK_FILE, error=CertbotInputError)
                if raw.strip()
                else {}
            )
            before = json.dumps(table, sort_keys=True)
            out = fn(table)
            after = json.dumps(table, sort_keys=True)
            if after != before:
                data = after.encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                os.fsync(fd)
            return out

    async def _run(self, fn: Callable[[dict[str, Any]], T]) -> T:
        return await asyncio.to_thread(self._transact, fn)
