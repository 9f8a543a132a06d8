"""dstack-gateway as a cluster on etcd: a real etcd cluster of three members and three gateway
processes, each in its own network namespace with its own WireGuard interface, joined to one
test-made bridge (10.211.<n>.0/24) with a stand-in CVM in a namespace of its own.

A CVM registered on node 1 is reached through nodes 2 and 3, and still after node 1 is killed;
it re-registers on a surviving node keeping its address; one etcd member down loses nothing; a
node marked down refuses registrations and leaves the CVMs' peer lists; etcd unreachable at
start is a one-line error, and while etcd has lost its quorum the known routes keep working,
registrations fail clearly, and both work again once etcd is back.

No test asserts on time: waits end on the condition and fail after a patience.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from pydstack.crypto.wgkeys import generate_private_key, public_key_of
from pydstack.devetcd import EtcdCluster
from pydstack.devgateway import free_udp_port
from pydstack.devstack import free_port
from pydstack.guest.gateway_client import gateway_check
from pydstack.rpc.client import PrpcClient
from pydstack.rpc.proto import gateway_rpc_pb2 as gpb
from pydstack.rpc.server import RpcError
from pydstack.vmm.backends.sandbox.network import bridge_mac_for
from tests.gateway_pki import KmsPki, app_info, random_hex

from .gateway_env import DOMAIN, Pki, make_pki

REPO = Path(__file__).resolve().parents[2]
PATIENCE = 60.0
TAG = f"{os.getpid() % 10000}"
OCTET = 20 + os.getpid() % 200
LAN = f"10.211.{OCTET}"
WG = f"100.103.{OCTET}"
CVM_WG = f"h13c{TAG}"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server is not installed"),
]


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(args, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {out.stderr}")
    return out


class Lan:
    """a bridge on this host (LAN.1) and namespaces plugged into it."""

    def __init__(self) -> None:
        self.bridge = f"h13b{TAG}"
        self.spaces: list[str] = []

    def up(self) -> None:
        self.down()
        # a set address: one the bridge picked would move as namespaces join (network.py)
        mac = bridge_mac_for(self.bridge)
        sh("ip", "link", "add", self.bridge, "address", mac, "type", "bridge")
        sh("ip", "addr", "add", f"{LAN}.1/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        sh("iptables", "-I", "FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT")

    def namespace(self, k: int) -> str:
        """namespace h13n<tag><k> at LAN.<10+k>."""
        ns, veth = f"h13n{TAG}{k}", f"h13v{TAG}{k}"
        sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", veth, check=False)
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", f"h13p{TAG}{k}")
        sh("ip", "link", "set", f"h13p{TAG}{k}", "netns", ns)
        sh("ip", "link", "set", veth, "master", self.bridge)
        sh("ip", "link", "set", veth, "up")
        sh("ip", "-n", ns, "addr", "add", f"{LAN}.{10 + k}/24", "dev", f"h13p{TAG}{k}")
        sh("ip", "-n", ns, "link", "set", f"h13p{TAG}{k}", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        self.spaces.append(ns)
        return ns

    def down(self) -> None:
        for ns in self.spaces:
            # wireguard-go exits with its interface, not with the namespace
            # (wireguard-go's control sockets are shared: interface names are unique per test run)
            for iface in [f"h13w{TAG}{k}" for k in range(10)] + [CVM_WG]:
                sh("ip", "-n", ns, "link", "del", iface, check=False)
            sh("ip", "netns", "del", ns, check=False)
        self.spaces.clear()
        while sh("iptables", "-D", "FORWARD", "-i", self.bridge, "-o", self.bridge, "-j",
                 "ACCEPT", check=False).returncode == 0:  # fmt: skip
            pass
        sh("ip", "link", "del", self.bridge, check=False)


@dataclass
class Node:
    """one dstack-gateway of the cluster, in its own namespace."""

    k: int
    ns: str
    dir: Path
    kms: KmsPki
    app_id: bytes
    pki: Pki
    endpoints: list[str]
    proc: subprocess.Popen[bytes] | None = None
    admin_token: str = field(default_factory=lambda: os.urandom(8).hex())

    def __post_init__(self) -> None:
        self.ip = f"{LAN}.{10 + self.k}"
        self.rpc_port, self.admin_port, self.proxy_port = free_port(), free_port(), free_port()
        self.wg_port = free_udp_port()
        self.dir.mkdir(parents=True, exist_ok=True)
        chain, key = self.kms.server_cert(self.app_id, self.ip)
        files = {"rpc.crt": chain, "rpc.key": key, "kms-ca.crt": self.kms.root_pem,
                 "proxy.crt": self.pki.chain_pem, "proxy.key": self.pki.key_pem}  # fmt: skip
        for name, text in files.items():
            (self.dir / name).write_text(text)
        (self.dir / "gateway.toml").write_text(f"""
address = "{self.ip}:{self.rpc_port}"
[tls]
key = "rpc.key"
certs = "rpc.crt"
[tls.mutual]
ca_certs = "kms-ca.crt"
[core.admin]
enabled = true
address = "{self.ip}:{self.admin_port}"
auth_token = "{self.admin_token}"
[core.wg]
interface = "h13w{TAG}{self.k}"
ip = "{WG}.{self.k}/24"
reserved_net = ["{WG}.0/28"]
client_ip_range = "{WG}.0/24"
listen_port = {self.wg_port}
endpoint = "{self.ip}:{self.wg_port}"
config_path = "wg/h13w.conf"
[core.proxy]
listen_addr = "{self.ip}"
listen_port = {self.proxy_port}
workers = 1
tls_versions = ["1.2", "1.3"]
base_domain = "{DOMAIN}"
cert_chain = "proxy.crt"
cert_key = "proxy.key"
[core.proxy.timeouts]
cache_top_n = "0s"
connect = "2s"
[core.sync]
enabled = true
node_id = {self.k}
my_url = "https://{self.ip}:{self.rpc_port}"
data_dir = "data"
interval = "2s"
timeout = "2s"
sync_connections_interval = "2s"
etcd_endpoints = {json.dumps(self.endpoints)}
etcd_prefix = "/h13-test"
""")

    def start(self) -> Node:
        log = self.dir / "gateway.log"
        offset = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sys.executable, "-m", "pydstack.gateway.main",
                 "-c", str(self.dir / "gateway.toml")],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
            )  # fmt: skip
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            text = log.read_bytes()[offset:].decode(errors="replace")
            if "dstack-gateway listening on" in text:
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway {self.k} exited: {text[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"gateway {self.k} did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self, chain: str, key: str) -> PrpcClient:
        return PrpcClient(
            f"https://{self.ip}:{self.rpc_port}", prefix="/prpc", client_cert_pem=chain,
            client_key_pem=key, ca_pem=self.kms.root_pem,
            verify_server=gateway_check(self.app_id.hex()),
        )  # fmt: skip

    async def register(self, chain: str, key: str, public_key: str) -> gpb.RegisterCvmResponse:
        req = gpb.RegisterCvmRequest(client_public_key=public_key)
        req.port_policy.CopyFrom(gpb.PortPolicy(restrict_mode=False))
        async with self.client(chain, key) as c:
            return await c.call("RegisterCvm", req, gpb.RegisterCvmResponse)

    def admin(self, method: str, body: dict | None = None) -> httpx.Response:
        return httpx.post(
            f"http://{self.ip}:{self.admin_port}/prpc/{method}?json", json=body or {},
            headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=30,
        )  # fmt: skip

    def hosts(self) -> dict[str, str]:
        """instance id → address, as this node's admin Status lists them."""
        r = self.admin("Status")
        assert r.status_code == 200, r.text
        return {h["instance_id"]: h["ip"] for h in r.json().get("hosts", [])}

    async def get(self, name: str) -> bytes:
        """one HTTPS GET through this node's proxy for `name`.DOMAIN: the body."""
        ctx = self.pki.client_context()
        r, w = await asyncio.open_connection(
            self.ip, self.proxy_port, ssl=ctx, server_hostname=f"{name}.{DOMAIN}"
        )
        try:
            w.write(f"GET / HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n".encode())
            data = await asyncio.wait_for(r.read(), PATIENCE)
        finally:
            w.close()
        return data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""


@dataclass
class World:
    lan: Lan
    etcd: EtcdCluster
    nodes: list[Node]
    cvm_ns: str
    kms: KmsPki


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("cluster")
    lan = Lan()
    lan.up()
    etcd = EtcdCluster(root / "etcd", 3, host=f"{LAN}.1")
    nodes: list[Node] = []
    try:
        etcd.start()
        kms, app_id, pki = KmsPki(), os.urandom(20), make_pki()
        for k in (1, 2, 3):
            ns = lan.namespace(k)
            nodes.append(Node(k, ns, root / f"gw{k}", kms, app_id, pki, etcd.endpoints))
        for n in nodes:
            n.start()
        yield World(lan, etcd, nodes, lan.namespace(9), kms)
    finally:
        for n in nodes:
            n.stop()
        etcd.stop()
        lan.down()


def cvm(world: World, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", world.cvm_ns, sys.executable, "-m", "tests.integration.fake_cvm",
         *args],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wg_keys() -> tuple[str, str]:
    private = generate_private_key()
    return private, public_key_of(private)


async def until(cond: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.3)


async def reaches(node: Node, name: str, body: bytes) -> bool:
    try:
        return await node.get(name) == body
    except (OSError, asyncio.IncompleteReadError):
        return False


async def refused(node: Node, chain: str, key: str, pk: str) -> str:
    with pytest.raises(RpcError) as e:
        await node.register(chain, key, pk)
    return str(e.value)


@dataclass
class Cvm:
    app: str
    iid: str
    chain: str
    key: str
    private: str
    public: str
    ip: str = ""


@pytest.fixture(scope="module")
def served(world: World) -> Iterator[Cvm]:
    """a CVM registered on node 1, its tunnel up to every node, an app on :8080."""
    app, iid = random_hex(), random_hex()
    chain, key = world.kms.client_cert(app_info(app, iid))
    private, public = wg_keys()
    node1 = world.nodes[0]
    resp = asyncio.run(node1.register(chain, key, public))
    peers = [[s.pk, s.ip.split("/")[0], s.endpoint] for s in resp.wg.servers]
    up = cvm(world, "wg", f"/run/h13-{world.cvm_ns}/wg.conf", CVM_WG, resp.wg.client_ip,
             json.dumps(peers))  # fmt: skip
    out, err = up.communicate(private + "\n", timeout=PATIENCE)
    assert up.returncode == 0 and "up" in out, err
    backend = cvm(world, "serve", "8080", f"cvm {iid}")
    try:
        assert backend.stdout is not None and "serving" in backend.stdout.readline()
        yield Cvm(app, iid, chain, key, private, public, resp.wg.client_ip)
    finally:
        backend.kill()
        backend.wait()


async def test_a_cvm_registered_on_node_1_is_routable_through_the_others_and_outlives_it(
    world: World, served: Cvm
) -> None:
    node1, node2, node3 = world.nodes
    # node 1 handed out every node as the cvm's wireguard peers and gateways
    resp = await node1.register(served.chain, served.key, served.public)
    assert resp.wg.client_ip == served.ip
    assert sorted(s.endpoint for s in resp.wg.servers) == sorted(
        f"{n.ip}:{n.wg_port}" for n in world.nodes
    )
    assert sorted(g.id for g in resp.gateways) == [1, 2, 3]
    body = f"cvm {served.iid}".encode()
    name = f"{served.iid}-8080"
    for node in (node2, node3):
        await until(lambda node=node: reaches(node, name, body), f"the route via {node.k}")
    # every node knows every node (from etcd)
    status = node2.admin("Status").json()
    assert sorted(n["id"] for n in status["nodes"]) == [1, 2, 3] and status["id"] == 2

    # node 1 knows every node's handshake with the cvm (what recycling goes by)
    async def observed() -> bool:
        got = node1.admin("GetInstanceHandshakes", {"instance_id": served.iid}).json()
        return {h["observer_node_id"] for h in got.get("handshakes", [])} == {1, 2, 3}

    await until(observed, "every node's handshake in node 1's view")

    # a connection held open through node 2 shows in node 1's cluster-wide counts
    ctx = node2.pki.client_context()
    r, w = await asyncio.open_connection(
        node2.ip, node2.proxy_port, ssl=ctx, server_hostname=f"{name}.{DOMAIN}"
    )
    w.write(b"GET / HTTP/1.1\r\nhost: x\r\n")  # the request is not finished: it stays open
    await w.drain()

    async def counted() -> bool:
        stats = node1.admin("GetGlobalConnections").json()
        return stats.get("node_connections", {}).get("2") == 1

    try:
        await until(counted, "node 2's open connection in node 1's global counts")
    finally:
        w.close()
    del r

    node1.kill()
    try:
        assert await node2.get(name) == body and await node3.get(name) == body
        # the cvm re-registers on a surviving node and keeps its address
        again = await node2.register(served.chain, served.key, served.public)
        assert again.wg.client_ip == served.ip
        assert node3.hosts()[served.iid] == served.ip
    finally:
        node1.start()
    # node 1 is back with the cluster's state, routing the cvm too
    assert node1.hosts()[served.iid] == served.ip
    await until(lambda: reaches(node1, name, body), "the route via the restarted node 1")


async def test_one_etcd_member_down_loses_nothing(world: World, served: Cvm) -> None:
    node1, node2, node3 = world.nodes
    world.etcd.stop_member(0, kill=True)
    try:
        app, iid = random_hex(), random_hex()
        chain, key = world.kms.client_cert(app_info(app, iid))
        resp = await node3.register(chain, key, wg_keys()[1])
        assert resp.wg.client_ip not in (served.ip, "")

        async def everywhere() -> bool:
            return all(n.hosts().get(iid) == resp.wg.client_ip for n in world.nodes)

        await until(everywhere, "the new instance on every node")
        # two nodes never hand out one address, whichever node is asked
        ips = set()
        for n in world.nodes:
            a, i = random_hex(), random_hex()
            c, k = world.kms.client_cert(app_info(a, i))
            ips.add((await n.register(c, k, wg_keys()[1])).wg.client_ip)
        assert len(ips) == 3 and not ips & {served.ip, resp.wg.client_ip}
    finally:
        world.etcd.start_member(0)
    # the member that was away catches up, and another member goes down
    world.etcd.stop_member(2, kill=True)
    try:
        assert node1.hosts()[iid] == resp.wg.client_ip
        assert node2.hosts()[served.iid] == served.ip
        assert await node2.get(f"{served.iid}-8080") == f"cvm {served.iid}".encode()
    finally:
        world.etcd.start_member(2)


async def test_a_node_marked_down_stops_receiving_registrations(world: World, served: Cvm) -> None:
    node1, node2, node3 = world.nodes
    assert node1.admin("SetNodeStatus", {"id": 3, "status": "down"}).status_code == 200
    try:
        app, iid = random_hex(), random_hex()
        chain, key = world.kms.client_cert(app_info(app, iid))
        assert "marked as down" in await refused(node3, chain, key, wg_keys()[1])
        resp = await node2.register(chain, key, wg_keys()[1])
        # the other nodes no longer hand node 3 out as a peer
        assert sorted(g.id for g in resp.gateways) == [1, 2]
        assert f"{node3.ip}:{node3.wg_port}" not in [s.endpoint for s in resp.wg.servers]
        statuses = node2.admin("GetNodeStatuses").json()["statuses"]
        assert {"node_id": 3, "status": "down"} in statuses
    finally:
        assert node2.admin("SetNodeStatus", {"id": 3, "status": "up"}).status_code == 200
    resp = await node3.register(chain, key, wg_keys()[1])
    assert sorted(g.id for g in resp.gateways) == [1, 2, 3]


async def test_etcd_away_during_operation_keeps_routes_and_refuses_registrations(
    world: World, served: Cvm
) -> None:
    node2 = world.nodes[1]
    name, body = f"{served.iid}-8080", f"cvm {served.iid}".encode()
    # two of three members down: the last one has no quorum and answers nothing in time
    for i in range(2):
        world.etcd.stop_member(i, kill=True)
    try:
        for node in world.nodes:
            assert await node.get(name) == body
        app, iid = random_hex(), random_hex()
        chain, key = world.kms.client_cert(app_info(app, iid))
        message = await refused(node2, chain, key, wg_keys()[1])
        assert "state store is unavailable" in message and "http://" not in message
        assert iid not in node2.hosts()
    finally:
        for i in range(2):
            world.etcd.start_member(i, wait=False)
        for i in range(3):
            world.etcd.wait_member(i, PATIENCE)
    resp = await node2.register(chain, key, wg_keys()[1])
    assert resp.wg.client_ip and node2.hosts()[iid] == resp.wg.client_ip

    # the other nodes follow the cluster again (their watches came back)
    async def followed() -> bool:
        return world.nodes[2].hosts().get(iid) == resp.wg.client_ip

    await until(followed, "node 3 to learn the registration made after etcd came back")


def test_etcd_unreachable_at_start_is_one_clear_line(tmp_path) -> None:
    dead = free_port()
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"""
[tls]
key = "k"
certs = "c"
[core.sync]
enabled = true
node_id = 1
data_dir = "data"
timeout = "2s"
etcd_endpoints = ["http://127.0.0.1:{dead}"]
""")
    out = subprocess.run(
        [sys.executable, "-m", "pydstack.gateway.main", "-c", str(cfg)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    line = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert line == [
        f"error: cannot start the cluster node: etcd is unavailable "
        f"(http://127.0.0.1:{dead}: Connection refused)"
    ], out.stderr
