"""a CVM deployed by `dstack deploy` with gateway_urls, reached through dstack-gateway the way
users reach it: by app id and by instance id, with the TLS terminated at the gateway (its
certificate verified against the stack's CA), passed through to the app's own TLS (verified
against the KMS root), and as HTTP/2 negotiated with the gateway (ALPN h2).

Heavy (a whole dev stack with a sandbox CVM): run it alone, under the shared lock
(`flock /tmp/pydstack-heavy.lock .venv/bin/pytest ...`).
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from cryptography import x509

from pydstack.apps.image import hello_image
from pydstack.attest.ratls import parse_ratls_cert
from pydstack.devgateway import GatewayHttp
from pydstack.devstack import DevStack

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sandbox cvms need root")

BRIDGE, SUBNET = "dstacktest6", "10.210.0.0/16"
PATIENCE = 120.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = DevStack(tmp_path_factory.mktemp("gwstack"), bridge=BRIDGE, subnet=SUBNET, gateway=True)
    try:
        s.start()
        yield s
    finally:
        s.stop(remove_bridge=True)


def dstack(stack: DevStack, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pydstack.vmm.cli", "--url", stack.vmm_url, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": str(stack.dir / "home")},
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def cvm(stack: DevStack, tmp_path_factory) -> dict[str, str]:
    """the sample app with its https (8443) and h2c (8081) listeners, gateway enabled."""
    image = stack.push_image(hello_image())
    d: Path = tmp_path_factory.mktemp("app")
    (d / "docker-compose.yml").write_text(f"""
services:
  hello:
    image: {image}
    environment:
      PORT: "8080"
      TLS_PORT: "8443"
      H2C_PORT: "8081"
    volumes:
      - /var/run/dstack.sock:/var/run/dstack.sock
""")
    out = dstack(
        stack, "compose", "--name", "gwapp", "--docker-compose", str(d / "docker-compose.yml"),
        "--kms", "--gateway", "--output", str(d / "app-compose.json"),
    )  # fmt: skip
    compose_hash = out.split("Compose hash:")[1].split()[0]
    app_id = compose_hash[:40]
    stack.allow({app_id: [compose_hash]})
    out = dstack(
        stack, "deploy", "--name", "gwapp", "--image", "pydstack-sandbox",
        "--compose", str(d / "app-compose.json"), "--gateway-url", stack.gateway_url,
    )  # fmt: skip
    vm_id = out.split("Created VM with ID:")[1].split()[0]
    info = stack.wait_vm(vm_id, timeout=240)
    return {"app_id": app_id, "instance_id": str(info["instance_id"]), "vm_id": vm_id}


@pytest.fixture(scope="module")
def web(stack: DevStack):
    w = GatewayHttp(stack.gateway_files.proxy_ca, stack.gateway_proxy_port)
    yield w
    w.close()


def test_terminate_by_app_id_and_by_instance_id(
    stack: DevStack, cvm: dict[str, str], web: GatewayHttp
) -> None:
    r = web.wait(f"{cvm['app_id']}-8080", timeout=PATIENCE)
    assert r.status_code == 200 and r.json() == {"ok": True}
    info = web.get(f"{cvm['instance_id']}-8080", "/").json()
    assert info["app_id"] == cvm["app_id"] and info["instance_id"] == cvm["instance_id"]
    status = stack.gateway_rpc("Status")
    (host,) = status["hosts"]
    assert host["instance_id"] == cvm["instance_id"] and host["latest_handshake"] > 0
    policy = stack.gateway_rpc("GetInstancePortPolicy", {"instance_id": cvm["instance_id"]})
    assert policy["source"] == "instance" and policy["effective"]["restrict_mode"] is False


def _tls(stack: DevStack, sni: str, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", stack.gateway_proxy_port), timeout=30)
    return ctx.wrap_socket(raw, server_hostname=sni)


def test_passthrough_reaches_the_apps_own_tls(
    stack: DevStack, cvm: dict[str, str], web: GatewayHttp
) -> None:
    web.wait(f"{cvm['app_id']}-8080", timeout=PATIENCE)
    ctx = ssl.create_default_context(cafile=str(stack.gateway_files.kms_ca))
    ctx.check_hostname = False  # the app's certificate names the app, not a host
    for name in (f"{cvm['app_id']}-8443s", f"{cvm['instance_id']}-8443s"):
        deadline = time.monotonic() + PATIENCE
        while True:
            try:
                with _tls(stack, f"{name}.{stack.base_domain}", ctx) as s:
                    der = s.getpeercert(binary_form=True)
                    s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    data = b""
                    while chunk := s.recv(65536):
                        data += chunk
                break
            except (ssl.SSLError, OSError):
                if time.monotonic() > deadline:  # the app's tls listener may start late
                    raise
                time.sleep(1)
        assert data.startswith(b"HTTP/1.0 200") and b'{"ok": true}' in data
        cert = x509.load_der_x509_certificate(der)  # type: ignore[arg-type]
        assert parse_ratls_cert(cert).app_id == bytes.fromhex(cvm["app_id"])  # the app's own


def test_h2_is_negotiated_at_the_gateway_and_spoken_by_the_app(
    stack: DevStack, cvm: dict[str, str], web: GatewayHttp
) -> None:
    web.wait(f"{cvm['app_id']}-8080", timeout=PATIENCE)
    ctx = ssl.create_default_context(cafile=str(stack.gateway_files.proxy_ca))
    ctx.set_alpn_protocols(["h2"])
    name = f"{cvm['app_id']}-8081g.{stack.base_domain}"
    with _tls(stack, name, ctx) as s:
        assert s.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        headers = [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", name)]
        conn.send_headers(1, headers, end_stream=True)
        s.sendall(conn.data_to_send())
        status, body, ended = None, b"", False
        while not ended:
            data = s.recv(65536)
            assert data, "the connection closed before the response ended"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = dict(ev.headers)[b":status"]
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                elif isinstance(ev, h2.events.StreamEnded):
                    ended = True
            s.sendall(conn.data_to_send())
    assert status == b"200" and body == b'{"proto": "h2", "stream": 1}'
