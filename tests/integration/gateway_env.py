"""helpers for the gateway data-plane tests: a throwaway PKI, loopback backends and TLS clients."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pydstack.gateway.certstore import CertStore
from pydstack.gateway.config import ProxyConfig
from pydstack.gateway.proxy import ProxyServer
from pydstack.gateway.routes import RouteSettings, RouteTable

DOMAIN = "gw.test"
#: how long a test waits for an answer before it fails (never an assertion on time)
PATIENCE = 30.0


@dataclass(frozen=True)
class Pki:
    ca_pem: str
    chain_pem: str
    key_pem: str

    def client_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.ca_pem)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx


def _pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def make_pki(domain: str = DOMAIN, *, days: int = 30, expired: bool = False) -> Pki:
    """a CA and a `*.domain` leaf signed by it (ECDSA P-256)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway test ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=2))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"*.{domain}")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=2))
        .not_valid_after(now - dt.timedelta(days=1) if expired else now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"*.{domain}")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return Pki(ca.public_bytes(pem).decode(), leaf.public_bytes(pem).decode(), _pem(key))


@dataclass
class Backend:
    """a loopback TCP server that records what it got and answers per `mode`:
    echo (bytes back), http (one `200 <name>` per request head), banner (sends first)."""

    name: str
    mode: str = "echo"
    host: str = "127.0.0.1"
    port: int = 0
    received: list[bytes] = field(default_factory=list)
    peers: int = 0
    server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> Backend:
        self.server = await asyncio.start_server(self._serve, self.host, port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.peers += 1
        try:
            if self.mode == "banner":
                w.write(f"hello from {self.name}\n".encode())
                await w.drain()
            buf = b""
            while True:
                data = await r.read(65536)
                if not data:
                    break
                self.received.append(data)
                if self.mode == "http":
                    buf += data
                    while b"\r\n\r\n" in buf:
                        _, buf = buf.split(b"\r\n\r\n", 1)
                        body = self.name.encode()
                        w.write(
                            b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
                        )
                else:
                    w.write(data)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()

    def seen(self) -> bytes:
        return b"".join(self.received)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def proxy_config(**overrides: object) -> ProxyConfig:
    base: dict[str, object] = {
        "listen_addr": "127.0.0.1",
        "listen_port": 0,
        "tls_versions": ["1.2", "1.3"],
    }
    debug: dict[str, object] = {}
    for k, v in overrides.items():
        if k.startswith("debug_"):
            debug[k.removeprefix("debug_")] = v
        else:
            base[k] = v
    timeouts = base.pop("timeouts", {})
    doc = {"core": {"proxy": {**base, "timeouts": timeouts}, "debug": debug}}
    if base.get("listen_port") == 0:
        doc["core"]["proxy"]["listen_port"] = 1  # type: ignore[index]
    return ProxyConfig.from_dict(doc)


async def start_proxy(
    pki: Pki,
    *,
    table: RouteTable | None = None,
    config: ProxyConfig | None = None,
    **kw: object,
) -> tuple[ProxyServer, int]:
    """a ProxyServer on 127.0.0.1:<ephemeral> with `pki`'s wildcard for DOMAIN."""
    from pydstack.gateway.proxy import listen_socket

    config = config or proxy_config()
    certs = CertStore(config.tls_versions)
    certs.set(DOMAIN, pki.chain_pem, pki.key_pem)
    table = table or RouteTable(
        RouteSettings(
            connect_top_n=config.connect_top_n,
            max_connections_per_app=config.max_connections_per_app,
        )
    )
    server = ProxyServer(config, table, certs, **kw)  # type: ignore[arg-type]
    sock = listen_socket("127.0.0.1", 0)
    addrs = await server.start([sock])
    return server, addrs[0][1]


async def tls_exchange(
    port: int,
    sni: str,
    pki: Pki,
    payload: bytes,
    *,
    alpn: list[str] | None = None,
    read_until_eof: bool = False,
    expect: int | None = None,
    prefix: bytes = b"",
) -> tuple[bytes, str | None]:
    """TLS to the proxy with `sni`: send `payload`, read `expect` bytes (or to EOF)."""
    ctx = pki.client_context(alpn)
    if prefix:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(prefix)
        await w.drain()
        await w.start_tls(ctx, server_hostname=sni)
    else:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni)
    selected = w.get_extra_info("ssl_object").selected_alpn_protocol()
    w.write(payload)
    await w.drain()
    if read_until_eof:
        data = await asyncio.wait_for(r.read(), PATIENCE)
    else:
        n = len(payload) if expect is None else expect
        data = await asyncio.wait_for(r.readexactly(n), PATIENCE)
    w.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await w.wait_closed()
    return data, selected
