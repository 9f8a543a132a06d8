"""``[core.proxy] workers`` processes on SO_REUSEPORT, supervised by the control plane's process.

:class:`WorkerPool` (in the parent, next to the control plane's route table and cert store):

* starts ``workers`` children (``python -m pydstack.gateway.worker``), each binding its own
  SO_REUSEPORT listeners, so the kernel spreads new connections over them;
* copies the :class:`~.routes.RouteTable` (instances, policies, handshakes), the
  :class:`~.certstore.CertStore` and the ``gateway`` id's app-info/acme-info into each child over a
  private socketpair whenever :meth:`WorkerPool.publish` sees a change (the control plane calls
  it after every change; a 0.5 s poll catches the rest);
* gathers each child's live connection counts every second: the parent table's
  ``remote_counts`` holds the sum (for status pages) and each child learns the others' share,
  so ``max_connections_per_app`` holds across processes (within a second's lag);
* forwards a child's "policy unknown" to the parent table's ``on_policy_missing``;
* restarts a child that dies (after 1 s), and on :meth:`stop` passes SIGTERM on and waits.

Messages are 4-byte big-endian length + JSON, at most :data:`MAX_MESSAGE` bytes. A child exits
when its control socket closes (the parent is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .certstore import CertStore
from .config import ProxyConfig, config_to_plain
from .routes import RouteTable
from .tickets import TICKET_KEY_BYTES

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 << 20
COUNTS_INTERVAL = 1.0
POLL_INTERVAL = 0.5
RESTART_DELAY = 1.0

InfoSource = Callable[[], Awaitable[Any]]


async def send_message(writer: asyncio.StreamWriter, msg: Mapping[str, Any]) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError("worker message too large")
    writer.write(len(data).to_bytes(4, "big") + data)
    await writer.drain()


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """the next message, or None at EOF. ValueError for an oversized or non-object message."""
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError:
        return None
    n = int.from_bytes(head, "big")
    if n > MAX_MESSAGE:
        raise ValueError("worker message too large")
    try:
        body = await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        return None
    msg = json.loads(body)
    if not isinstance(msg, dict):
        raise ValueError("worker message is not an object")
    return msg


class _Child:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.counts: dict[str, int] = {}
        self.ready: asyncio.Future[list[list[Any]]] | None = None
        self.sent_versions: tuple[int, int, int] = (-1, -1, -1)


class WorkerPool:
    """the supervisor of the data-plane worker processes."""

    def __init__(
        self,
        config: ProxyConfig,
        table: RouteTable,
        certs: CertStore,
        *,
        app_info: InfoSource | None = None,
        acme_info: InfoSource | None = None,
        workers: int | None = None,
        python: str = sys.executable,
    ) -> None:
        self.config = config
        self.table = table
        self.certs = certs
        self.app_info = app_info
        self.acme_info = acme_info
        self.count = workers if workers is not None else config.workers
        self.python = python
        self.children = [_Child(i) for i in range(self.count)]
        self.info_version = 0
        self._info: dict[str, Any] = {"app_info": None, "acme_info": None}
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self.restarts = 0
        #: session-ticket keys every worker uses, so a ticket resumes on any of them
        self.ticket_keys = os.urandom(TICKET_KEY_BYTES)

    async def start(self) -> list[list[Any]]:
        """start every child; the addresses the first one listens on."""
        await self.refresh_info()
        addrs: list[list[Any]] = []
        for child in self.children:
            got = await self._spawn(child)
            addrs = addrs or got
        self._tasks.append(asyncio.ensure_future(self._poll()))
        return addrs

    async def refresh_info(self) -> None:
        """re-read app-info and acme-info from the control plane's callables (published to the
        children with the next :meth:`publish`)."""
        info: dict[str, Any] = {}
        for key, source in (("app_info", self.app_info), ("acme_info", self.acme_info)):
            try:
                info[key] = None if source is None else await source()
            except Exception:
                log.exception("reading %s for the workers failed", key)
                info[key] = self._info.get(key)
        if info != self._info:
            self._info = info
            self.info_version += 1

    async def _spawn(self, child: _Child) -> list[list[Any]]:
        parent_sock, child_sock = socket.socketpair()
        try:
            child.proc = subprocess.Popen(
                [self.python, "-m", "pydstack.gateway.worker", str(child_sock.fileno())],
                pass_fds=[child_sock.fileno()],
            )
        finally:
            child_sock.close()
        reader, writer = await asyncio.open_connection(sock=parent_sock)
        child.writer = writer
        child.counts = {}
        child.sent_versions = (-1, -1, -1)
        loop = asyncio.get_running_loop()
        child.ready = loop.create_future()
        child.reader_task = asyncio.ensure_future(self._read_child(child, reader))
        await send_message(
            writer,
            {
                "t": "init",
                "index": child.index,
                "config": config_to_plain(self.config),
                "ticket_keys": self.ticket_keys.hex(),
            },
        )
        await self._send_state(child)
        return await asyncio.wait_for(asyncio.shield(child.ready), 30)

    async def _send_state(self, child: _Child) -> None:
        writer = child.writer
        if writer is None:
            return
        versions = (self.table.version, self.certs.version, self.info_version)
        sent = child.sent_versions
        if versions[1] != sent[1]:
            await send_message(writer, {"t": "certs", "entries": self.certs.entries()})
        if versions[0] != sent[0]:
            await send_message(writer, {"t": "routes", "snapshot": self.table.snapshot()})
        if versions[2] != sent[2]:
            await send_message(writer, {"t": "info", **self._info})
        child.sent_versions = versions

    async def publish(self) -> None:
        """send what changed in the table, the certificates or the info to every child."""
        for child in self.children:
            with contextlib.suppress(ConnectionError, OSError):
                await self._send_state(child)

    async def _read_child(self, child: _Child, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                msg = await read_message(reader)
                if msg is None:
                    break
                kind = msg.get("t")
                if kind == "ready" and child.ready is not None and not child.ready.done():
                    child.ready.set_result(list(msg.get("addrs", [])))
                elif kind == "counts":
                    raw = msg.get("counts", {})
                    child.counts = {str(k): int(v) for k, v in raw.items()}
                    await self._share_counts()
                elif kind == "policy_missing" and self.table.on_policy_missing is not None:
                    self.table.on_policy_missing(str(msg.get("id", "")))
        except (ValueError, ConnectionError, OSError) as e:
            log.warning("worker %d control channel failed: %s", child.index, e)
        finally:
            if child.ready is not None and not child.ready.done():
                child.ready.set_exception(RuntimeError(f"worker {child.index} exited early"))
            if not self._stopping:
                self._tasks.append(asyncio.ensure_future(self._restart(child)))

    async def _share_counts(self) -> None:
        total: dict[str, int] = {}
        for c in self.children:
            for k, v in c.counts.items():
                total[k] = total.get(k, 0) + v
        self.table.remote_counts = total
        for c in self.children:
            if c.writer is None:
                continue
            others = {k: v - c.counts.get(k, 0) for k, v in total.items()}
            with contextlib.suppress(ConnectionError, OSError):
                await send_message(c.writer, {"t": "remote", "counts": others})

    async def _restart(self, child: _Child) -> None:
        proc = child.proc
        if proc is not None:
            await asyncio.to_thread(proc.wait)
            log.warning("gateway worker %d exited (%s); restarting", child.index, proc.returncode)
        if child.writer is not None:
            child.writer.close()
            child.writer = None
        await asyncio.sleep(RESTART_DELAY)
        if self._stopping:
            return
        self.restarts += 1
        try:
            await self._spawn(child)
        except Exception:
            log.exception("restarting gateway worker %d failed", child.index)

    async def _poll(self) -> None:
        while not self._stopping:
            await asyncio.sleep(POLL_INTERVAL)
            await self.publish()

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children if c.proc is not None]

    async def stop(self, timeout: float | None = None) -> None:
        """SIGTERM to every child, wait (``timeouts.shutdown`` + 5 s), then SIGKILL."""
        self._stopping = True
        wait = (self.config.timeouts.shutdown + 5.0) if timeout is None else timeout
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        for child in self.children:
            proc = child.proc
            if proc is None:
                continue
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), wait)
            except TimeoutError:
                proc.kill()
                await asyncio.to_thread(proc.wait)
            if child.writer is not None:
                child.writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def raise_nofile() -> None:
    """``core.set_ulimit``: the soft NOFILE limit up to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
