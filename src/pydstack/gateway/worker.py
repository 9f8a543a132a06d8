"""one data-plane worker process (started by :class:`~.workers.WorkerPool`, never by hand).

``python -m pydstack.gateway.worker <fd>``: `fd` is the control socket. The first message is the
config; then certificates, routes, info and the other workers' connection counts arrive as the
parent publishes them. The worker runs a :class:`~.proxy.ProxyServer` on uvloop with its own
SO_REUSEPORT listeners, reports its live connection counts every second and the instances whose
port policy is unknown, and on SIGTERM (or when the control socket closes) stops accepting, lets
live connections run for ``timeouts.shutdown`` and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys
from typing import Any

import uvloop

from .certstore import CertStore, CertStoreError
from .config import config_from_plain
from .proxy import ProxyServer
from .routes import RouteSettings, RouteTable
from .workers import COUNTS_INTERVAL, raise_nofile, read_message, send_message

log = logging.getLogger("pydstack.gateway.worker")


class _Info:
    def __init__(self) -> None:
        self.app_info: Any = None
        self.acme_info: Any = None

    async def get_app_info(self) -> Any:
        return self.app_info

    async def get_acme_info(self) -> Any:
        return self.acme_info


async def run(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_connection(sock=sock)
    first = await read_message(reader)
    if first is None or first.get("t") != "init":
        raise SystemExit("gateway worker: no init message")
    config = config_from_plain(first["config"])
    if config.set_ulimit:
        raise_nofile()
    t = config.timeouts
    table = RouteTable(
        RouteSettings(
            connect_top_n=config.connect_top_n,
            cache_top_n=t.cache_top_n,
            handshake_stale=t.handshake_stale,
            max_connections_per_app=config.max_connections_per_app,
        )
    )
    keys = first.get("ticket_keys")
    certs = CertStore(config.tls_versions, ticket_keys=bytes.fromhex(keys) if keys else None)
    info = _Info()
    server = ProxyServer(
        config, table, certs, app_info=info.get_app_info, acme_info=info.get_acme_info
    )
    missing: set[str] = set()
    table.on_policy_missing = missing.add
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    started = False

    async def control() -> None:
        nonlocal started
        while True:
            msg = await read_message(reader)
            if msg is None:
                break
            kind = msg.get("t")
            if kind == "certs":
                _load_certs(certs, msg.get("entries", []))
            elif kind == "routes":
                table.load_snapshot(msg["snapshot"])
            elif kind == "info":
                info.app_info, info.acme_info = msg.get("app_info"), msg.get("acme_info")
            elif kind == "remote":
                table.remote_counts = {str(k): int(v) for k, v in msg["counts"].items()}
            if not started and kind == "info":
                # the parent sends certs, routes and info in that order after init
                addrs = await server.start()
                started = True
                # what exists now lives as long as the worker: the cyclic collector, which
                # runs every few hundred connections, need not walk it each time
                gc.freeze()
                await send_message(writer, {"t": "ready", "addrs": [list(a) for a in addrs]})
        stop.set()

    async def report() -> None:
        last: dict[str, int] = {}
        while True:
            await asyncio.sleep(COUNTS_INTERVAL)
            counts = table.local_counts()
            if counts != last:
                await send_message(writer, {"t": "counts", "counts": counts})
                last = counts
            for iid in sorted(missing):
                await send_message(writer, {"t": "policy_missing", "id": iid})
            missing.clear()

    tasks = [asyncio.ensure_future(control()), asyncio.ensure_future(report())]
    await stop.wait()
    await server.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    writer.close()


def _load_certs(certs: CertStore, entries: list[Any]) -> None:
    wanted = {str(e[0]) for e in entries}
    for domain in certs.domains():
        if domain not in wanted:
            certs.remove(domain)
    for domain, chain, key in entries:
        current = certs.get(domain)
        if current is not None and current.chain_pem == chain and current.key_pem == key:
            continue
        try:
            certs.set(domain, chain, key)
        except CertStoreError as e:
            log.warning("certificate for %s not loaded: %s", domain, e)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if len(sys.argv) != 2 or not sys.argv[1].isdigit():
        raise SystemExit("usage: python -m pydstack.gateway.worker <control-fd>")
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(run(int(sys.argv[1])))


if __name__ == "__main__":
    main()
