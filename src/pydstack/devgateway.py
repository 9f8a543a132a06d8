"""the dev stack's dstack-gateway: its certificates and its gateway.toml.

In production the gateway runs in a CVM and takes its RPC certificate from the KMS through its
own guest agent: a certificate signed with the KMS's app CA for the gateway's app id. The dev
stack runs it on the host, so the stack (which runs the KMS and holds its root key in
``kms-certs``) issues that certificate the same way, for a gateway app id it makes once per stack
and writes into the KMS allowlist (``gatewayAppId``). The check a CVM makes stays meaningful: the
gateway must present a chain to the KMS root CA naming exactly that app id, and the gateway
accepts only client certificates chaining to the same root (``tls.mutual.ca_certs``).

The proxy's certificate is a wildcard ``*.<base_domain>`` from a local CA the stack makes
(``gateway/proxy-ca.crt``, what a client verifies against; every key 0600). The base domain is
``dstack.localhost``: names under ``.localhost`` stay on this machine (curl and browsers resolve
them to the loopback address).

With ACME (the main job) there is no local CA for the proxy: the stack runs Debian's ``pebble``
validating DNS-01 through a ``bind9`` primary for the base domain (:mod:`pydstack.certbot.devdns`),
gives the gateway ``[core.certbot]`` (pebble's TLS roots, bind9 as the resolver for the
propagation check) and configures a ZT-domain through the gateway's admin API (an RFC 2136
credential for that bind9, pebble's directory): the gateway's certbot orders the wildcard and
serves it, and clients trust pebble's issuing root, saved from pebble's management endpoint to
``gateway/acme-root.crt``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from pydstack.crypto.certs import CertRequest, cert_pem, generate_p256_key, issue_cert, key_pem
from pydstack.kms.derive import app_ca
from pydstack.kms.keys import KeyStore

BASE_DOMAIN = "dstack.localhost"


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)


@dataclass(frozen=True)
class GatewayFiles:
    """where the dev gateway's files live under the stack directory."""

    dir: Path

    @property
    def app_id_file(self) -> Path:
        return self.dir / "app-id"

    @property
    def acme_root(self) -> Path:
        """pebble's issuing root (what a client verifies the ACME certificate against)."""
        return self.dir / "acme-root.crt"

    @property
    def rpc_cert(self) -> Path:
        return self.dir / "rpc.crt"

    @property
    def rpc_key(self) -> Path:
        return self.dir / "rpc.key"

    @property
    def kms_ca(self) -> Path:
        return self.dir / "kms-ca.crt"

    @property
    def proxy_ca(self) -> Path:
        return self.dir / "proxy-ca.crt"

    @property
    def proxy_cert(self) -> Path:
        return self.dir / "proxy.crt"

    @property
    def proxy_key(self) -> Path:
        return self.dir / "proxy.key"

    @property
    def config(self) -> Path:
        return self.dir / "gateway.toml"

    def app_id(self) -> str:
        """the stack's gateway app id (20 random bytes, hex), made once."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.app_id_file.exists():
            _write(self.app_id_file, os.urandom(20).hex())
        return self.app_id_file.read_text().strip()

    def issue_rpc_cert(self, kms_cert_dir: Path, host_ip: str) -> None:
        """the gateway's rpc certificate: signed with the KMS app CA of the gateway app id,
        valid for `host_ip`, both server and client auth (chain: leaf, app CA)."""
        app_id = bytes.fromhex(self.app_id())
        keys = KeyStore(kms_cert_dir).load()
        ca_key, ca_cert = app_ca(keys.root_ca_key, keys.root_ca_cert, app_id)
        key = generate_p256_key()
        leaf = issue_cert(
            CertRequest(
                "dstack-gateway",
                alt_names=(host_ip, "localhost"),
                usage_server_auth=True,
                usage_client_auth=True,
                app_id=app_id,
                special_usage="app:custom",
            ),
            key.public_key(),
            ca_key,
            ca_cert,
        )
        _write(self.rpc_cert, cert_pem(leaf) + cert_pem(ca_cert))
        _write(self.rpc_key, key_pem(key), 0o600)
        _write(self.kms_ca, keys.ca_pem)

    def issue_proxy_cert(self, base_domain: str = BASE_DOMAIN) -> None:
        """a local CA (made once) and a fresh ``*.<base_domain>`` leaf it signs."""
        ca_key_file = self.dir / "proxy-ca.key"
        if ca_key_file.exists() and self.proxy_ca.exists():
            from pydstack.crypto.certs import load_cert_pem, load_key_pem

            ca_key = load_key_pem(ca_key_file.read_bytes())
            ca = load_cert_pem(self.proxy_ca.read_bytes())
        else:
            ca_key = generate_p256_key()
            ca = issue_cert(
                CertRequest("pydstack dev gateway CA", org_name="pydstack", ca_level=0),
                ca_key.public_key(),
                ca_key,
            )
            _write(ca_key_file, key_pem(ca_key), 0o600)
            _write(self.proxy_ca, cert_pem(ca))
        key = generate_p256_key()
        name = f"*.{base_domain}"
        leaf = issue_cert(
            CertRequest(name, alt_names=(name,), usage_server_auth=True),
            key.public_key(),
            ca_key,
            ca,
        )
        _write(self.proxy_cert, cert_pem(leaf) + cert_pem(ca))
        _write(self.proxy_key, key_pem(key), 0o600)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def remove_interface(name: str) -> bool:
    """delete a network interface of the host (the gateway's WireGuard: its wireguard-go
    daemon exits with it); whether there was one."""
    if subprocess.run(["ip", "link", "show", name], capture_output=True).returncode != 0:
        return False
    subprocess.run(["ip", "link", "del", name], capture_output=True)
    return True


def wg_subnet_for(bridge_subnet: str) -> str:
    """the gateway's WireGuard /24 of a stack: ``100.100.<n>.0/24`` with n the second octet of
    the stack's bridge subnet (so concurrent stacks do not collide; shared address space)."""
    octet = ipaddress.ip_network(bridge_subnet).network_address.packed[1]
    return f"100.100.{octet}.0/24"


def interface_for(bridge: str) -> str:
    """the stack's gateway WireGuard interface name (within IFNAMSIZ)."""
    return ("gw" + bridge)[:15]


def gateway_toml(
    files: GatewayFiles,
    *,
    rpc_address: str,
    rpc_port: int,
    admin_port: int,
    admin_token: str,
    proxy_port: int,
    wg_port: int,
    wg_subnet: str,
    interface: str,
    base_domain: str = BASE_DOMAIN,
    pccs_url: str = "",
    root_ca: Path | None = None,
    acme_ca_bundle: Path | None = None,
    dns_resolver: str = "",
) -> str:
    """the stack's gateway.toml; with `acme_ca_bundle` (pebble's TLS roots) and `dns_resolver`
    the proxy has no static certificate and the certbot reaches pebble and checks DNS-01
    records at the resolver, else the wildcard of the stack's CA."""
    net = ipaddress.ip_network(wg_subnet)
    gw_ip = net.network_address + 1
    client_range = ipaddress.ip_network(f"{net.network_address}/{net.prefixlen + 1}")
    attestation = ""
    if root_ca is not None:
        attestation = f"""
[core.attestation]
insecure_allow_external_trust_anchors = true

[core.attestation.urls]
pccs = "{pccs_url}"

[core.attestation.root_ca]
tdx = "{root_ca}"
"""
    certificate = f"""base_domain = "{base_domain}"
cert_chain = "{files.proxy_cert}"
cert_key = "{files.proxy_key}"
"""
    certbot = ""
    if acme_ca_bundle is not None:
        certificate = ""
        certbot = f"""
[core.certbot]
acme_ca_bundle = "{acme_ca_bundle}"
dns_resolvers = ["{dns_resolver}"]
"""
    return f"""# the dev stack's dstack-gateway
address = "{rpc_address}:{rpc_port}"

[tls]
key = "{files.rpc_key}"
certs = "{files.rpc_cert}"

[tls.mutual]
ca_certs = "{files.kms_ca}"

[core.admin]
enabled = true
address = "127.0.0.1:{admin_port}"
auth_token = "{admin_token}"

[core.wg]
interface = "{interface}"
ip = "{gw_ip}/{net.prefixlen}"
reserved_net = ["{gw_ip}/32"]
client_ip_range = "{client_range}"
listen_port = {wg_port}
endpoint = "{rpc_address}:{wg_port}"
config_path = "{files.dir / "wireguard" / (interface + ".conf")}"

[core.proxy]
listen_addr = "127.0.0.1"
listen_port = {proxy_port}
workers = 1
tls_versions = ["1.2", "1.3"]
{certificate}external_port = {proxy_port}

[core.sync]
data_dir = "{files.dir / "data"}"
my_url = "https://{rpc_address}:{rpc_port}"
{attestation}{certbot}"""


class GatewayHttp:
    """an HTTPS client of apps behind the dev gateway, as a user reaches them:
    ``https://<name>.<base_domain>:<port>`` with the name's SNI and Host, connected to the
    loopback address where the proxy listens, the certificate verified against the stack's
    proxy CA."""

    def __init__(self, ca: Path, port: int, base_domain: str = BASE_DOMAIN) -> None:
        self.port = port
        self.base_domain = base_domain
        self.client = httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), timeout=30)

    def url(self, name: str) -> str:
        return f"https://{name}.{self.base_domain}:{self.port}"

    def get(self, name: str, path: str, params: dict[str, str] | None = None) -> httpx.Response:
        host = f"{name}.{self.base_domain}"
        return self.client.get(
            f"https://127.0.0.1:{self.port}{path}",
            params=params,
            headers={"Host": f"{host}:{self.port}"},
            extensions={"sni_hostname": host},
        )

    def wait(self, name: str, path: str = "/health", timeout: float = 120) -> httpx.Response:
        """GET until the app answers 200 through the gateway (registration, the first
        handshake and the gateway's next handshake poll come first)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = self.get(name, path)
                if r.status_code == 200 or time.monotonic() > deadline:
                    return r
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.5)

    def close(self) -> None:
        self.client.close()
