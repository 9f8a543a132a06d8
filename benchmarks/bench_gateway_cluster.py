"""dstack-gateway as a three-node cluster on a three-member etcd: how long a registration takes,
how soon the other nodes route a new instance, and what a CVM sees when its node dies.

    .venv/bin/python benchmarks/bench_gateway_cluster.py [--n 30]

Real processes in network namespaces on one test-made bridge (the harness of
tests/integration/test_gateway_cluster.py): etcd 3.4 from Debian, three `dstack-gateway`
processes with their WireGuard interfaces, a stand-in CVM with its tunnel to every node and an
app behind it. Reference in the same run: `Info` over the same mutual-TLS client (a no-work call
with the same connection setup), so the registration's own cost is the difference. Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from common import pct
from google.protobuf.empty_pb2 import Empty

from pydstack.devetcd import EtcdCluster
from pydstack.rpc.proto import gateway_rpc_pb2 as gpb
from tests.gateway_pki import KmsPki, app_info, random_hex
from tests.integration.gateway_env import make_pki
from tests.integration.test_gateway_cluster import (
    CVM_WG,
    LAN,
    Lan,
    Node,
    World,
    cvm,
    reaches,
    wg_keys,
)


def row(label: str, values: list[float]) -> None:
    print(
        f"  {label:<52} p50 {pct(values, 50) * 1e3:8.1f} ms   p99 {pct(values, 99) * 1e3:8.1f} ms"
        f"   n={len(values)}",
        flush=True,
    )


async def timed_calls(node: Node, n: int) -> tuple[list[float], list[float]]:
    """n RegisterCvm of fresh instances on `node`, and n Info calls, each on a new connection."""
    reg, info = [], []
    for _ in range(n):
        chain, key = node.kms.client_cert(app_info(random_hex(), random_hex()))
        t = time.perf_counter()
        async with node.client(chain, key) as c:
            await c.call("Info", Empty(), gpb.InfoResponse)
        info.append(time.perf_counter() - t)
        t = time.perf_counter()
        await node.register(chain, key, wg_keys()[1])
        reg.append(time.perf_counter() - t)
    return reg, info


async def propagation(world: World, n: int) -> list[float]:
    """registered on node 1 → listed by node 2's admin Status (polled every 10 ms)."""
    node1, node2 = world.nodes[0], world.nodes[1]
    out = []
    for _ in range(n):
        iid = random_hex()
        chain, key = world.kms.client_cert(app_info(random_hex(), iid))
        await node1.register(chain, key, wg_keys()[1])
        t = time.perf_counter()
        while iid not in node2.hosts():
            await asyncio.sleep(0.01)
        out.append(time.perf_counter() - t)
    return out


async def failover(world: World) -> None:
    node1, node2, node3 = world.nodes
    app, iid = random_hex(), random_hex()
    chain, key = world.kms.client_cert(app_info(app, iid))
    private, public = wg_keys()
    resp = await node1.register(chain, key, public)
    peers = [[s.pk, s.ip.split("/")[0], s.endpoint] for s in resp.wg.servers]
    up = cvm(world, "wg", f"/run/h13-{world.cvm_ns}/wg.conf", CVM_WG, resp.wg.client_ip,
             json.dumps(peers))  # fmt: skip
    up.communicate(private + "\n", timeout=60)
    backend = cvm(world, "serve", "8080", f"cvm {iid}")
    try:
        assert backend.stdout is not None and "serving" in backend.stdout.readline()
        name, body = f"{iid}-8080", f"cvm {iid}".encode()
        t = time.perf_counter()
        while not await reaches(node2, name, body):
            await asyncio.sleep(0.01)
        print(f"  a new cvm's app first answered through node 2 after      "
              f"{(time.perf_counter() - t) * 1e3:8.1f} ms (tunnel handshake included)")  # fmt: skip
        ok = failed = 0
        node1.kill()
        t = time.perf_counter()
        while time.perf_counter() - t < 3:
            for node in (node2, node3):
                if await reaches(node, name, body):
                    ok += 1
                else:
                    failed += 1
        print(f"  requests through nodes 2 and 3 in the 3 s after node 1 was killed: "
              f"{ok} answered, {failed} failed")  # fmt: skip
        t = time.perf_counter()
        again = await node2.register(chain, key, public)
        print(f"  the cvm's re-registration on node 2 (same address "
              f"{again.wg.client_ip == resp.wg.client_ip}):        "
              f"{(time.perf_counter() - t) * 1e3:8.1f} ms")  # fmt: skip
        t = time.perf_counter()
        node1.start()
        print(f"  node 1 restarted with the cluster's state, serving after "
              f"{(time.perf_counter() - t) * 1e3:8.1f} ms")  # fmt: skip
    finally:
        backend.kill()
        backend.wait()


async def run(world: World, n: int) -> None:
    print(f"# dstack-gateway cluster: 3 nodes, etcd 3.4 with 3 members, {n} calls per row")
    reg, info = await timed_calls(world.nodes[0], n)
    row("Info (no work; new mutual-TLS connection)", info)
    row("RegisterCvm of a new instance (etcd transaction)", reg)
    row("registered on node 1 -> listed by node 2", await propagation(world, n))
    await failover(world)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30, help="calls per row")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces)")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        lan = Lan()
        lan.up()
        etcd = EtcdCluster(root / "etcd", 3, host=f"{LAN}.1")
        nodes: list[Node] = []
        try:
            etcd.start()
            kms, app_id, pki = KmsPki(), os.urandom(20), make_pki()
            for k in (1, 2, 3):
                nodes.append(Node(k, lan.namespace(k), root / f"gw{k}", kms, app_id, pki,
                                  etcd.endpoints))  # fmt: skip
            for node in nodes:
                node.start()
            asyncio.run(run(World(lan, etcd, nodes, lan.namespace(9), kms), args.n))
        finally:
            for node in nodes:
                node.stop()
            etcd.stop()
            lan.down()


if __name__ == "__main__":
    main()
