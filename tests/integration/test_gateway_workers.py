"""the worker pool: processes on SO_REUSEPORT fed by the parent's route table, counts shared,
a dead worker restarted, SIGTERM passed on; 10k idle sockets do not stop anyone being served."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import time

from pydstack.gateway.certstore import CertStore
from pydstack.gateway.policy import OPEN_POLICY
from pydstack.gateway.routes import Instance, RouteSettings, RouteTable
from pydstack.gateway.workers import WorkerPool

from .gateway_env import DOMAIN, Backend, make_pki, proxy_config, tls_exchange

PATIENCE = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(cond, what: str) -> None:
    end = time.monotonic() + PATIENCE
    while not cond():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        await asyncio.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_pool_serves_follows_the_table_restarts_and_stops() -> None:
    pki = make_pki()
    b = await Backend("pool", "echo").start()
    port = free_port()
    cfg = proxy_config(listen_port=port, workers=2, max_connections_per_app=3)
    table = RouteTable(RouteSettings(max_connections_per_app=3))
    certs = CertStore(cfg.tls_versions)
    certs.set(DOMAIN, pki.chain_pem, pki.key_pem)
    asked: list[str] = []
    table.on_policy_missing = asked.append

    async def app_info():
        return {"app_id": "gw"}

    pool = WorkerPool(cfg, table, certs, app_info=app_info)
    addrs = await pool.start()
    assert addrs == [["127.0.0.1", port]]
    pids = pool.pids()
    sni = f"a1-{b.port}.{DOMAIN}"
    try:
        assert len(pids) == 2 and all(alive(p) for p in pids)
        # an instance registered after start reaches the workers with the next publish
        table.upsert(Instance("i1", "a1", "127.0.0.1", public_key="k1", reported_policy=None))
        table.set_handshakes({"k1": time.time()})
        await pool.publish()
        # policy unknown: refused, and the parent is asked to fetch it
        for _ in range(4):
            with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError):
                await tls_exchange(port, sni, pki, b"x")
        await until(lambda: "i1" in asked, "the policy request")
        table.set_reported_policy("i1", OPEN_POLICY)
        await pool.publish()
        # a publish is not acknowledged: a worker applies it when it next reads its control
        # channel, so a connection accepted before that still meets the unknown policy
        end = time.monotonic() + PATIENCE
        while True:
            try:
                assert (await tls_exchange(port, sni, pki, b"hello"))[0] == b"hello"
                break
            except (ConnectionError, OSError, asyncio.IncompleteReadError):
                assert time.monotonic() < end, "the published policy never reached the workers"
                await asyncio.sleep(0.05)
        got = await tls_exchange(
            port,
            f"gateway.{DOMAIN}",
            pki,
            b"GET /.dstack/app-info HTTP/1.1\r\n\r\n",
            read_until_eof=True,
        )
        assert got[0].endswith(b'{"app_id": "gw"}')

        # connections held on any worker count against the app's limit in every worker
        ctx = pki.client_context()
        held = []
        for _ in range(3):
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni)
            w.write(b"h")
            assert await r.readexactly(1) == b"h"
            held.append((r, w))
        await until(lambda: table.connections("i1") == 3, "the parent's count")
        await asyncio.sleep(1.5)  # one more round of counts to every worker
        refused = 0
        for _ in range(6):
            try:
                await tls_exchange(port, sni, pki, b"y")
            except (ConnectionError, OSError, asyncio.IncompleteReadError):
                refused += 1
        assert refused == 6
        for _, w in held:
            w.close()
        await until(lambda: table.connections("i1") == 0, "the counts to drop")

        # a worker that dies is replaced, and the pool keeps serving meanwhile
        os.kill(pids[0], signal.SIGKILL)
        await until(
            lambda: pool.restarts == 1 and len(set(pool.pids()) - set(pids)) == 1, "the restart"
        )
        for _ in range(6):
            assert (await tls_exchange(port, sni, pki, b"again"))[0] == b"again"
    finally:
        current = pool.pids()
        await pool.stop()
        await b.stop()
    assert not any(alive(p) for p in current)


async def test_ten_thousand_idle_sockets_do_not_stop_service() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pki = make_pki()
    b = await Backend("busy", "echo").start()
    port = free_port()
    cfg = proxy_config(listen_port=port, workers=2, timeouts={"handshake": "60s"})
    table = RouteTable(RouteSettings())
    table.upsert(Instance("i1", "a1", "127.0.0.1", public_key="k", reported_policy=OPEN_POLICY))
    certs = CertStore(cfg.tls_versions)
    certs.set(DOMAIN, pki.chain_pem, pki.key_pem)
    pool = WorkerPool(cfg, table, certs)
    await pool.start()
    idle: list[socket.socket] = []
    try:
        n = min(10_000, hard - 2000)
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            idle.append(s)
        for _ in range(10):
            got = await tls_exchange(port, f"i1-{b.port}.{DOMAIN}", pki, b"still here")
            assert got[0] == b"still here"
        assert n >= 10_000 or hard < 12_000
    finally:
        for s in idle:
            s.close()
        await pool.stop()
        await b.stop()
