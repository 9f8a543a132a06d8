"""the gateway's etcd client and stores against a real etcd member on loopback: https with a
client certificate (``core.sync.etcd_ca_cert/etcd_cert/etcd_key`` through
:func:`~pydstack.gateway.cluster.build_cluster`), a client without a certificate refused, and a
watch that sees another client's change."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pydstack.devetcd import EtcdCluster, MemberTls
from pydstack.errors import ConfigError
from pydstack.gateway.cluster import build_cluster
from pydstack.gateway.etcd import EtcdClient, EtcdTls, EtcdUnavailable
from pydstack.gateway.etcdstore import EtcdStore
from pydstack.gateway.settings import GatewayConfig
from pydstack.gateway.store import InstanceRecord

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd-server is not installed")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_tls(d: Path) -> None:
    """ca.pem, server.pem/key (127.0.0.1), client.pem/key under `d`."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("etcd test ca"))
        .issuer_name(_name("etcd test ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write(d / "ca", ca_key, ca)
    # etcd's json gateway dials its own member with the member's certificate: with
    # --client-cert-auth that certificate must allow client auth too
    server_usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    for name, usage, san in (
        ("server", server_usage, True),
        ("client", [ExtendedKeyUsageOID.CLIENT_AUTH], False),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(f"etcd {name}"))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        _write(d / name, key, builder.sign(ca_key, hashes.SHA256()))


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory) -> Iterator[tuple[EtcdCluster, Path]]:
    d = tmp_path_factory.mktemp("etcdtls")
    make_tls(d)
    cluster = EtcdCluster(
        d / "etcd",
        1,
        tls=MemberTls(d / "server.pem", d / "server.key", d / "ca.pem"),
        health_tls=(d / "ca.pem", d / "client.pem", d / "client.key"),
    )
    try:
        cluster.start()
        yield cluster, d
    finally:
        cluster.stop()


def config(d: Path, endpoints: list[str], **sync: object) -> GatewayConfig:
    table = {
        "enabled": True,
        "node_id": 1,
        "data_dir": str(d / "data"),
        "timeout": "3s",
        "etcd_endpoints": endpoints,
        "etcd_prefix": "/tls-test",
        **sync,
    }
    return GatewayConfig.from_dict(
        {"tls": {"key": "k", "certs": "c"}, "core": {"sync": table}}, base=d
    )


async def test_https_with_a_client_certificate_from_the_config(tls_etcd) -> None:
    cluster, d = tls_etcd
    cfg = config(
        d, cluster.endpoints, etcd_ca_cert="ca.pem", etcd_cert="client.pem", etcd_key="client.key"
    )
    c = await build_cluster(cfg)
    try:
        assert c.client is not None and c.client.endpoints[0].startswith("https://")

        def add(state) -> None:
            state.instances["i1"] = InstanceRecord("i1", "app", "10.0.0.2", "k1", 1.0)

        await c.store.transact(add)
        await c.kv.put("global/certbot_config", "{}")
        again = EtcdStore(
            EtcdClient(
                cluster.endpoints,
                tls=EtcdTls(d / "ca.pem", d / "client.pem", d / "client.key"),
            ),
            "/tls-test",
        )
        await again.open()
        assert set(again.load().instances) == {"i1"}
        assert await c.kv.get("global/certbot_config") == "{}"
        await again.client.close()
    finally:
        await c.close()


async def test_without_a_client_certificate_etcd_refuses(tls_etcd) -> None:
    cluster, d = tls_etcd
    client = EtcdClient(cluster.endpoints, timeout=3, tls=EtcdTls(d / "ca.pem"))
    try:
        with pytest.raises(EtcdUnavailable, match="etcd is unavailable"):
            await client.get(b"/tls-test/x")
    finally:
        await client.close()
    # and a client certificate file that is not one is named at start
    (d / "broken.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"broken\.pem"):
        EtcdTls(d / "ca.pem", d / "broken.pem", d / "client.key").context()


async def test_a_watch_sees_another_clients_change(tls_etcd) -> None:
    cluster, d = tls_etcd
    tls = EtcdTls(d / "ca.pem", d / "client.pem", d / "client.key")
    a, b = EtcdClient(cluster.endpoints, tls=tls), EtcdClient(cluster.endpoints, tls=tls)
    try:
        rev = await a.put(b"/tls-test/w", b"0")
        events = a.watch(b"/tls-test/w", start_revision=rev + 1)
        changed = asyncio.ensure_future(anext(events))
        await b.put(b"/tls-test/w", b"1")
        assert await asyncio.wait_for(changed, 30) > rev
        await events.aclose()
    finally:
        await a.close()
        await b.close()
