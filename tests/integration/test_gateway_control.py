"""dstack-gateway as a process: RegisterCvm over mutual TLS with KMS-signed client certificates,
a stand-in CVM in its own network namespace bringing up the tunnel with the guest's code, traffic
through the proxy and WireGuard to it by instance id and by app id, state across a restart, every
RegisterCvm refusal, and the admin server's authentication.

Everything runs on addresses the test makes: a network namespace joined to the host by a veth
pair (10.209.<n>.0/24), the gateway's WireGuard network (100.101.<n>.0/24) and loopback. No test
asserts on time: waits end on the condition and fail after a patience.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import bcrypt
import httpx
import pytest

from pydstack.crypto.wgkeys import generate_private_key, public_key_of
from pydstack.devgateway import free_udp_port
from pydstack.devstack import free_port
from pydstack.guest.gateway_client import gateway_check
from pydstack.rpc.client import PrpcClient
from pydstack.rpc.proto import gateway_rpc_pb2 as gpb
from pydstack.rpc.server import RpcError
from tests.gateway_pki import KmsPki, app_info, random_hex

from .gateway_env import DOMAIN, make_pki

REPO = Path(__file__).resolve().parents[2]
PATIENCE = 60.0
_SEQ = itertools.count()

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(args, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {out.stderr}")
    return out


@dataclass
class Net:
    """a namespace ("the cvm's host") joined to this host by a veth pair."""

    n: int
    ns: str = ""
    host_ip: str = ""
    cvm_ip: str = ""

    def __post_init__(self) -> None:
        tag = f"{os.getpid() % 1000}{self.n}"
        self.ns, self.veth = f"h11cvm{tag}", f"h11v{tag}"
        self.octet = 200 + (os.getpid() + self.n) % 50
        self.host_ip, self.cvm_ip = f"10.209.{self.octet}.1", f"10.209.{self.octet}.2"

    def up(self) -> None:
        self.down()
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "p" + self.veth)
        sh("ip", "link", "set", "p" + self.veth, "netns", self.ns)
        sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.veth)
        sh("ip", "link", "set", self.veth, "up")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.cvm_ip}/24", "dev", "p" + self.veth)
        sh("ip", "-n", self.ns, "link", "set", "p" + self.veth, "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")

    @property
    def wg_iface(self) -> str:
        return f"h11c{self.ns[-6:]}"

    def down(self) -> None:
        # the tunnel first: its wireguard-go exits with its interface, not with the namespace
        sh("ip", "-n", self.ns, "link", "del", self.wg_iface, check=False)
        sh("ip", "link", "del", self.veth, check=False)
        sh("ip", "netns", "del", self.ns, check=False)

    def run(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "tests.integration.fake_cvm",
             *args],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip


@dataclass
class Gateway:
    """a dstack-gateway process with a test KMS PKI."""

    dir: Path
    net: Net
    kms: KmsPki = field(default_factory=KmsPki)
    app_id: bytes = field(default_factory=lambda: os.urandom(20))
    admin_token: str = field(default_factory=lambda: os.urandom(8).hex())
    debug: bool = False
    htpasswd: str = ""
    proc: subprocess.Popen[bytes] | None = None
    urls: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.iface = f"h11gw{os.getpid() % 1000}{next(_SEQ)}"
        self.wg_net = f"100.101.{self.net.octet}"
        self.proxy_port, self.wg_port = free_port(), free_udp_port()
        self.pki = make_pki()
        self.dir.mkdir(parents=True, exist_ok=True)
        chain, key = self.kms.server_cert(self.app_id, self.net.host_ip)
        files = {"rpc.crt": chain, "rpc.key": key, "kms-ca.crt": self.kms.root_pem,
                 "proxy.crt": self.pki.chain_pem, "proxy.key": self.pki.key_pem}  # fmt: skip
        for name, text in files.items():
            (self.dir / name).write_text(text)
        htpasswd = ""
        if self.htpasswd:
            (self.dir / "htpasswd").write_text(self.htpasswd)
            htpasswd = f'htpasswd_file = "{self.dir / "htpasswd"}"'
        debug = (
            f'[core.debug]\ninsecure_enable_debug_rpc = true\naddress = "127.0.0.1:{free_port()}"'
        )
        (self.dir / "gateway.toml").write_text(f"""
address = "{self.net.host_ip}:{free_port()}"
[tls]
key = "rpc.key"
certs = "rpc.crt"
[tls.mutual]
ca_certs = "kms-ca.crt"
[core.admin]
enabled = true
address = "127.0.0.1:{free_port()}"
auth_token = "{self.admin_token}"
{htpasswd}
{debug if self.debug else ""}
[core.wg]
interface = "{self.iface}"
ip = "{self.wg_net}.1/24"
reserved_net = ["{self.wg_net}.1/32"]
client_ip_range = "{self.wg_net}.0/25"
listen_port = {self.wg_port}
endpoint = "{self.net.host_ip}:{self.wg_port}"
config_path = "wg/{self.iface}.conf"
[core.proxy]
listen_addr = "127.0.0.1"
listen_port = {self.proxy_port}
workers = 1
tls_versions = ["1.2", "1.3"]
base_domain = "{DOMAIN}"
cert_chain = "proxy.crt"
cert_key = "proxy.key"
[core.proxy.timeouts]
cache_top_n = "0s"
[core.sync]
data_dir = "data"
""")

    def start(self) -> Gateway:
        log = open(self.dir / "gateway.log", "ab")  # noqa: SIM115 - the process keeps it
        offset = (self.dir / "gateway.log").stat().st_size
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pydstack.gateway.main", "-c", str(self.dir / "gateway.toml")],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            text = (self.dir / "gateway.log").read_bytes()[offset:].decode(errors="replace")
            if "dstack-gateway listening on" in text:
                for line in text.splitlines():
                    if line.startswith("dstack-gateway ") and " on " in line:
                        self.urls[line.split()[1]] = line.split()[-1]
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"the gateway exited: {text[-3000:]}")
            time.sleep(0.1)
        raise AssertionError("the gateway did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        sh("ip", "link", "del", self.iface, check=False)

    def client(self, chain: str | None = None, key: str | None = None) -> PrpcClient:
        return PrpcClient(
            self.urls["listening"], prefix="/prpc", client_cert_pem=chain, client_key_pem=key,
            ca_pem=self.kms.root_pem, verify_server=gateway_check(self.app_id.hex()),
        )  # fmt: skip

    async def register(
        self, chain: str, key: str, public_key: str, policy: gpb.PortPolicy | None = None
    ) -> gpb.RegisterCvmResponse:
        req = gpb.RegisterCvmRequest(client_public_key=public_key)
        req.port_policy.CopyFrom(policy or gpb.PortPolicy(restrict_mode=False))
        async with self.client(chain, key) as c:
            return await c.call("RegisterCvm", req, gpb.RegisterCvmResponse)

    def admin(self, method: str, body: dict | None = None, **headers: str) -> httpx.Response:
        if not headers:
            headers = {"Authorization": f"Bearer {self.admin_token}"}
        return httpx.post(f"{self.urls['admin']}/prpc/{method}?json", json=body or {},
                          headers=headers, timeout=30)  # fmt: skip

    async def get(self, name: str, path: str = "/") -> bytes:
        """one HTTPS GET through the proxy for `name`.DOMAIN: the response body."""
        ctx = self.pki.client_context()
        r, w = await asyncio.open_connection(
            "127.0.0.1", self.proxy_port, ssl=ctx, server_hostname=f"{name}.{DOMAIN}"
        )
        try:
            w.write(f"GET {path} HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n".encode())
            data = await asyncio.wait_for(r.read(), PATIENCE)
        finally:
            w.close()
        return data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""


@pytest.fixture
def net():
    n = Net(next(_SEQ))
    n.up()
    yield n
    n.down()


@pytest.fixture
def gateway(tmp_path, net):
    g = Gateway(tmp_path / "gw", net)
    try:
        g.start()
        yield g
    finally:
        g.cleanup()


def wg_keys() -> tuple[str, str]:
    private = generate_private_key()
    return private, public_key_of(private)


async def until(cond, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.5)


async def test_a_cvm_is_reached_through_its_tunnel_by_instance_and_app_and_after_a_restart(
    gateway: Gateway, net: Net
) -> None:
    app, iid = random_hex(), random_hex()
    chain, key = gateway.kms.client_cert(app_info(app, iid))
    private, public = wg_keys()
    resp = await gateway.register(chain, key, public)
    client_ip = resp.wg.client_ip
    assert client_ip == f"{gateway.wg_net}.2"
    (server,) = resp.wg.servers
    assert server.ip == f"{gateway.wg_net}.1/24"
    assert server.endpoint == f"{net.host_ip}:{gateway.wg_port}"
    assert resp.agent.internal_port == 8090 and resp.gateways[0].wg_public_key == server.pk

    peers = json.dumps([[server.pk, server.ip.split("/")[0], server.endpoint]])
    up = net.run("wg", f"/run/h11-{net.ns}/wg.conf", net.wg_iface, client_ip, peers)
    out, err = up.communicate(private + "\n", timeout=PATIENCE)
    assert up.returncode == 0 and "up" in out, err
    backend = net.run("serve", "8080", f"cvm {iid}")
    try:
        assert backend.stdout is not None and "serving" in backend.stdout.readline()
        # by instance id: no handshake needed first
        assert await gateway.get(f"{iid}-8080") == f"cvm {iid}".encode()

        # by app id: once the gateway has seen the tunnel's handshake
        async def shaken() -> bool:
            hosts = gateway.admin("Status").json()["hosts"]
            return bool(hosts and hosts[0]["latest_handshake"])

        await until(shaken, "the first handshake")

        async def by_app() -> bool:  # the workers learn the handshake with the next publish
            try:
                return await gateway.get(f"{app}-8080") == f"cvm {iid}".encode()
            except (ConnectionError, ssl.SSLError):
                return False

        await until(by_app, "the app id route")
        assert gateway.admin("GetMeta").json() == {"registered": 1, "online": 1}

        # the gateway restarts: its instances, addresses and peers are still there
        gateway.stop()
        gateway.start()
        status = gateway.admin("Status").json()
        assert [(h["instance_id"], h["ip"], h["app_id"]) for h in status["hosts"]] == [
            (iid, client_ip, app)
        ]
        assert await gateway.get(f"{iid}-8080") == f"cvm {iid}".encode()
        conf = (gateway.dir / "wg" / f"{gateway.iface}.conf").read_text()
        assert f"PublicKey = {public}\nAllowedIPs = {client_ip}/32" in conf
        assert oct((gateway.dir / "wg" / f"{gateway.iface}.conf").stat().st_mode)[-3:] == "600"
        # re-registering keeps the address
        again = await gateway.register(chain, key, public)
        assert again.wg.client_ip == client_ip
    finally:
        backend.kill()
        backend.wait()


async def test_register_cvm_refusals(gateway: Gateway) -> None:
    app_a, app_b, iid = random_hex(), random_hex(), random_hex()
    chain_a, key_a = gateway.kms.client_cert(app_info(app_a, iid))
    _, public = wg_keys()
    first = await gateway.register(chain_a, key_a, public)

    async def refused(chain: str | None, key: str | None, pk: str, policy=None) -> str:
        with pytest.raises(RpcError) as e:
            await gateway.register(chain, key, pk, policy)  # type: ignore[arg-type]
        return str(e.value)

    # another app's certificate claiming the instance id
    chain_b, key_b = gateway.kms.client_cert(app_info(app_b, iid))
    assert "registered to another app" in await refused(chain_b, key_b, wg_keys()[1])
    # a wireguard key another instance holds (another app's, and the same app's)
    chain_c, key_c = gateway.kms.client_cert(app_info(app_b, random_hex()))
    assert "public key is used by another instance" in await refused(chain_c, key_c, public)
    chain_d, key_d = gateway.kms.client_cert(app_info(app_a, random_hex()))
    assert "public key is used by another instance" in await refused(chain_d, key_d, public)
    # a malformed key and a port policy outside 1..65535
    assert "invalid wireguard public key" in await refused(chain_d, key_d, "x" * 44)
    bad = gpb.PortPolicy(restrict_mode=True, ports=[gpb.PortAttrs(port=70000)])
    assert "invalid port policy" in await refused(chain_d, key_d, wg_keys()[1], bad)
    # no client certificate; a certificate of another ca never gets through tls
    assert "client authentication is required" in await refused(None, None, wg_keys()[1])
    stranger = KmsPki().client_cert(app_info(app_a, random_hex()))
    with pytest.raises((ssl.SSLError, OSError, RpcError, aiohttp.ClientError)):
        await gateway.register(*stranger, wg_keys()[1])
    # a node marked down refuses, and up again it accepts
    assert gateway.admin("SetNodeStatus", {"id": 0, "status": "down"}).status_code == 200
    assert "marked as down" in await refused(chain_d, key_d, wg_keys()[1])
    assert gateway.admin("SetNodeStatus", {"id": 0, "status": "sideways"}).status_code == 400
    assert gateway.admin("SetNodeStatus", {"id": 0, "status": "up"}).status_code == 200
    ok = await gateway.register(chain_d, key_d, wg_keys()[1])
    # nothing a refusal tried stuck: the first instance is as it was
    hosts = {h["instance_id"]: h for h in gateway.admin("Status").json()["hosts"]}
    assert hosts[iid]["app_id"] == app_a and hosts[iid]["ip"] == first.wg.client_ip
    assert len(hosts) == 2 and ok.wg.client_ip != first.wg.client_ip
    assert "debug" not in gateway.urls  # off unless enabled


async def test_port_policies_through_the_admin_api(gateway: Gateway) -> None:
    app, iid = random_hex(), random_hex()
    chain, key = gateway.kms.client_cert(app_info(app, iid))
    policy = gpb.PortPolicy(restrict_mode=True, ports=[gpb.PortAttrs(port=8080, pp=True)])
    await gateway.register(chain, key, wg_keys()[1], policy)
    got = gateway.admin("GetInstancePortPolicy", {"instance_id": iid}).json()
    assert got["source"] == "instance" and got["effective"]["ports"] == [{"port": 8080, "pp": True}]
    lock = {"instance_id": iid, "policy": {"restrict_mode": True, "ports": []}}
    assert gateway.admin("SetInstancePortPolicy", lock).status_code == 200
    got = gateway.admin("GetInstancePortPolicy", {"instance_id": iid}).json()
    assert got["source"] == "admin" and got["effective"] == {"ports": [], "restrict_mode": True}
    assert got["instance_reported"]["ports"] == [{"port": 8080, "pp": True}]
    assert gateway.admin("ClearInstancePortPolicy", {"instance_id": iid}).status_code == 200
    assert gateway.admin("GetInstancePortPolicy", {"instance_id": iid}).json()["source"] == (
        "instance"
    )
    r = gateway.admin("SetInstancePortPolicy", {"instance_id": "nobody", "policy": {}})
    assert r.status_code == 400 and "not registered" in r.text


async def test_the_admin_server_refuses_without_credentials(tmp_path, net: Net) -> None:
    hashed = bcrypt.hashpw(b"builder", bcrypt.gensalt(rounds=4)).decode()
    g = Gateway(tmp_path / "gw", net, debug=True, htpasswd=f"bob:{hashed}\n")
    try:
        g.start()
        base = g.urls["admin"]
        for r in (
            g.admin("Status", Authorization=""),
            g.admin("Status", Authorization="Bearer wrong"),
            g.admin("Status", **{"X-Admin-Token": "wrong"}),
            httpx.get(f"{base}/"),
            httpx.get(f"{base}/Status"),
            httpx.get(f"{base}/prpc/Admin.Status", auth=("bob", "wrong")),
        ):
            assert r.status_code == 401, r.text
            assert r.headers["WWW-Authenticate"] == 'Basic realm="dstack-gateway admin"'
        assert g.admin("Status").status_code == 200
        assert g.admin("Status", **{"X-Admin-Token": g.admin_token}).status_code == 200
        assert httpx.get(f"{base}/prpc/Admin.Status", auth=("bob", "builder")).status_code == 200
        assert httpx.get(f"{base}/Status", params={"token": g.admin_token}).status_code == 200
        # the dashboard escapes what cvms send (the debug server takes any ids)
        r = httpx.post(
            f"{g.urls['debug']}/prpc/RegisterCvm?json",
            json={"client_public_key": wg_keys()[1], "app_id": "<b>x</b>", "instance_id": "i&1"},
        )
        assert r.status_code == 200, r.text
        page = httpx.get(f"{base}/", headers={"Authorization": f"Bearer {g.admin_token}"}).text
        assert "&lt;b&gt;x&lt;/b&gt;" in page and "i&amp;1" in page and "<b>x</b>" not in page
    finally:
        g.cleanup()


def test_a_bad_config_stops_the_start_with_one_line(tmp_path) -> None:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[tls]\nkey = "k"\ncerts = "c"\n[core.admin]\nenabled = true\n')
    env = {k: v for k, v in os.environ.items() if k not in ("DSTACK_GATEWAY_ADMIN_TOKEN",
                                                              "ADMIN_API_TOKEN")}  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "pydstack.gateway.main", "-c", str(cfg)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "the admin server needs core.admin.auth_token" in out.stderr


async def test_reload_cert_serves_the_new_certificate_and_exit_stops_the_gateway(
    gateway: Gateway,
) -> None:
    def served_cert() -> bytes:
        import socket

        raw = socket.create_connection(("127.0.0.1", gateway.proxy_port), timeout=30)
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with ctx.wrap_socket(raw, server_hostname=f"health.{DOMAIN}") as s:
            return s.getpeercert(binary_form=True) or b""

    before = served_cert()
    new = make_pki()
    (gateway.dir / "proxy.crt").write_text(new.chain_pem)
    (gateway.dir / "proxy.key").write_text(new.key_pem)
    assert gateway.admin("ReloadCert").status_code == 200

    async def switched() -> bool:  # the workers take it with the next publish
        return served_cert() != before

    await until(switched, "the reloaded certificate")
    body, _ = await tls_exchange_ok(gateway, new)
    assert body.startswith(b"HTTP/1.1 200")
    (gateway.dir / "proxy.key").write_text("not a key")
    r = gateway.admin("ReloadCert")
    assert r.status_code == 400 and "certificate not reloaded" in r.text
    assert gateway.admin("Exit", {"force": False}).status_code == 200
    assert gateway.proc is not None and gateway.proc.wait(timeout=PATIENCE) == 0


async def tls_exchange_ok(gateway: Gateway, pki) -> tuple[bytes, str | None]:
    """GET / of the `health` id, verified against `pki`."""
    from .gateway_env import tls_exchange

    req = f"GET / HTTP/1.1\r\nhost: health.{DOMAIN}\r\n\r\n".encode()
    return await tls_exchange(gateway.proxy_port, f"health.{DOMAIN}", pki, req, read_until_eof=True)
