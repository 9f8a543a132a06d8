"""dstack-gateway as a process with its certbot: a ZT-domain configured through the admin API
gets a wildcard certificate from a real pebble by DNS-01 through a real bind9 (RFC 2136, and the
Cloudflare API stand-in on top of it), the proxy serves it (a client verifying against pebble's
root sees it), AcmeInfo and ``/.dstack/acme-info`` list its attested key (a simulated guest
agent quotes it), a renewal swaps it without a restart and a restart serves it from storage; the
ACME server down keeps the old certificate until a retry succeeds; a DNS provider refusing leaves
nothing behind; no admin answer ever carries a token or a TSIG secret.

"The ACME server down" is its directory URL refusing connections: the gateway reaches pebble
through a TCP forwarder the test closes and reopens (pebble keeps its state, so the account
stays valid).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.empty_pb2 import Empty

from pydstack.certbot.acme_info import parse_acme_info
from pydstack.certbot.cfmock import CfMock
from pydstack.certbot.devdns import DevBind, DevPebble
from pydstack.certbot.rfc2136 import Rfc2136Dns
from pydstack.rpc.proto import gateway_rpc_pb2 as gpb

from .gateway_env import DOMAIN
from .simulator_proc import Simulator, start_simulator
from .test_gateway_control import _SEQ, Gateway, Net

PATIENCE = 120.0


class Forwarder:
    """a TCP forwarder to `port` on loopback that can be closed (connections refused) and
    reopened on the same port."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self.server: asyncio.Server | None = None

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            w.close()
            return

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(copy(r, uw), copy(ur, w))


class Admin:
    """async calls of the gateway's admin API (the test's loop keeps serving the stand-ins),
    every answer kept to check that none carries a secret."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.answers: list[str] = []

    async def __call__(self, method: str, body: dict | None = None) -> httpx.Response:
        async with httpx.AsyncClient(timeout=PATIENCE) as c:
            r = await c.post(
                f"{self.gw.urls['admin']}/prpc/{method}?json",
                json=body or {},
                headers={"Authorization": f"Bearer {self.gw.admin_token}"},
            )
        self.answers.append(r.text)
        return r

    async def ok(self, method: str, body: dict | None = None) -> dict:
        r = await self(method, body)
        assert r.status_code == 200, f"{method}: {r.text}"
        return r.json() if r.content else {}


async def until(cond, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.3)


async def served(gw: Gateway, sni: str, root_pem: str) -> x509.Certificate:
    """the leaf the proxy presents for `sni`, verified against `root_pem`."""
    ctx = ssl.create_default_context(cadata=root_pem)
    _, w = await asyncio.open_connection("127.0.0.1", gw.proxy_port, ssl=ctx, server_hostname=sni)
    try:
        der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        w.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await w.wait_closed()
    return x509.load_der_x509_certificate(der)


async def https_get(gw: Gateway, sni: str, path: str, root_pem: str) -> bytes:
    ctx = ssl.create_default_context(cadata=root_pem)
    r, w = await asyncio.open_connection("127.0.0.1", gw.proxy_port, ssl=ctx, server_hostname=sni)
    try:
        w.write(f"GET {path} HTTP/1.1\r\nhost: {sni}\r\nconnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(r.read(), PATIENCE)
    finally:
        w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


def spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net(next(_SEQ))
    n.up()
    yield n
    n.down()


@pytest.fixture
def simulator(tmp_path) -> Iterator[Simulator]:
    sim = start_simulator(tmp_path / "sim")
    yield sim
    sim.stop()


@pytest.fixture
async def acme(pebble: DevPebble) -> AsyncIterator[Forwarder]:
    fwd = Forwarder(pebble.port)
    await fwd.open()
    yield fwd
    await fwd.close()


def certbot_gateway(
    tmp_path: Path, net: Net, bind: DevBind, pebble: DevPebble, sim: Simulator
) -> Gateway:
    g = Gateway(tmp_path / "gw", net)
    toml = g.dir / "gateway.toml"
    toml.write_text(
        toml.read_text()
        + f"""
[core.certbot]
acme_ca_bundle = "{pebble.ca_bundle}"
dns_resolvers = ["{bind.server}"]
agent = "{sim.dstack_sock}"
"""
    )
    return g


@pytest.fixture
def gw(tmp_path, net, bind, pebble, simulator) -> Iterator[Gateway]:
    g = certbot_gateway(tmp_path, net, bind, pebble, simulator)
    try:
        g.start()
        yield g
    finally:
        g.cleanup()


async def test_a_zt_domain_gets_a_pebble_wildcard_served_attested_renewed_and_kept(
    gw: Gateway, bind: DevBind, pebble: DevPebble, acme: Forwarder
) -> None:
    admin = Admin(gw)
    root = pebble.root_pem()
    directory = f"https://127.0.0.1:{acme.port}/dir"
    provider = bind.provider()
    cred = await admin.ok(
        "CreateDnsCredential",
        {
            "name": "bind",
            "provider_type": "rfc2136",
            "set_as_default": True,
            "max_dns_wait": 30,
            "rfc2136_server": provider.server,
            "rfc2136_tsig_key_name": provider.tsig_key_name,
            "rfc2136_tsig_secret": provider.tsig_secret,
        },
    )
    assert cred["provider_type"] == "rfc2136" and cred["rfc2136_server"] == provider.server
    assert (
        cred["rfc2136_tsig_secret"] == f"{provider.tsig_secret[:4]}...{provider.tsig_secret[-4:]}"
    )
    await admin.ok("SetCertbotConfig", {"acme_url": directory, "caa_issuer": "pebble"})
    config = await admin.ok("GetCertbotConfig")
    assert config["acme_url"] == directory and config["caa_issuer"] == "pebble"
    added = await admin.ok("AddZtDomain", {"domain": "*.Example.Test.", "port": 443})
    assert added["config"]["domain"] == "example.test"
    assert added["cert_status"]["has_cert"] is False

    # the background pass the new domain started issues and loads the certificate
    async def loaded() -> bool:
        status = (await admin.ok("GetZtDomain", {"domain": "example.test"}))["cert_status"]
        return bool(status["has_cert"] and status["loaded_in_memory"])

    await until(loaded, "the first certificate")
    leaf = await served(gw, "gateway.example.test", root)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["*.example.test"]
    assert bind.query("_acme-challenge.example.test", "TXT") == []
    # the legacy static certificate still serves its own domain
    legacy = await served(gw, f"gateway.{DOMAIN}", gw.pki.ca_pem)
    assert spki(legacy) != spki(leaf)

    # its key is attested: AcmeInfo over rpc and /.dstack/acme-info through the proxy
    async with gw.client() as c:
        info = await c.call("AcmeInfo", Empty(), gpb.AcmeInfoResponse)
    account = info.account_uri
    assert account.startswith("https://127.0.0.1:") and info.account_quote
    assert [k.public_key for k in info.quoted_hist_keys] == [spki(leaf)]
    quote = json.loads(info.quoted_hist_keys[0].quote)
    assert quote["report_data"] == hashlib.sha512(b"zt-cert:" + spki(leaf)).hexdigest()
    body = json.loads(await https_get(gw, "gateway.example.test", "/.dstack/acme-info", root))
    assert body["account_uri"] == account
    # what dstack-ct-monitor reads from a gateway url
    assert [k.public_key for k in parse_acme_info(body)] == [spki(leaf)]
    assert [
        bytes.fromhex(k["public_key"].removeprefix("0x")) for k in body["quoted_hist_keys"]
    ] == [spki(leaf)]
    hist = await admin.ok("ListCertAttestations", {"domain": "example.test"})
    assert bytes.fromhex(hist["latest"]["public_key"]) == spki(leaf)

    # a forced renewal swaps the certificate in the running workers
    out = await admin.ok("RenewZtDomainCert", {"domain": "example.test", "force": True})
    assert out["renewed"] is True

    async def swapped() -> bool:
        return spki(await served(gw, "gateway.example.test", root)) != spki(leaf)

    await until(swapped, "the renewed certificate")
    renewed = await served(gw, "gateway.example.test", root)

    async def both_listed() -> bool:
        body = json.loads(await https_get(gw, "gateway.example.test", "/acme-info", root))
        keys = {bytes.fromhex(k["public_key"].removeprefix("0x")) for k in body["quoted_hist_keys"]}
        return keys == {spki(leaf), spki(renewed)}

    await until(both_listed, "the new key in acme-info")

    # the ACME server down: a renewal fails with a clear error and the certificate stays
    await acme.close()
    r = await admin("RenewZtDomainCert", {"domain": "example.test", "force": True})
    assert r.status_code == 400 and "acme" in r.text, r.text
    assert spki(await served(gw, "gateway.example.test", root)) == spki(renewed)
    status = (await admin.ok("GetZtDomain", {"domain": "example.test"}))["cert_status"]
    assert status["not_after"] == int(renewed.not_valid_after_utc.timestamp())
    # back up: the retry gets a new one
    await acme.open()
    out = await admin.ok("RenewZtDomainCert", {"domain": "example.test", "force": True})
    assert out["renewed"] is True

    async def swapped_again() -> bool:
        return spki(await served(gw, "gateway.example.test", root)) not in (
            spki(leaf),
            spki(renewed),
        )

    await until(swapped_again, "the certificate after the retry")
    latest = await served(gw, "gateway.example.test", root)

    # a restart serves the stored certificate from the start, without asking pebble
    await acme.close()
    gw.stop()
    gw.start()
    assert spki(await served(gw, "gateway.example.test", root)) == spki(latest)

    # no answer ever carried the secret
    assert all(provider.tsig_secret not in a for a in admin.answers)
    listed = await admin.ok("ListDnsCredentials")
    assert listed["default_id"] == cred["id"]
    assert provider.tsig_secret not in json.dumps(listed)


async def test_cloudflare_stand_in_issues_and_a_refusing_provider_leaves_nothing(
    gw: Gateway, bind: DevBind, pebble: DevPebble
) -> None:
    admin = Admin(gw)
    root = pebble.root_pem()
    token = "cf-token-0123456789abcdef"
    mock = CfMock(("cf.test",), tokens=(token,))
    mock.backend = Rfc2136Dns(bind.provider(), "cf.test")
    api = await mock.start()
    try:
        await admin.ok("SetCertbotConfig", {"acme_url": pebble.directory_url})
        cred = await admin.ok(
            "CreateDnsCredential",
            {"name": "cf", "provider_type": "cloudflare", "cf_api_token": token,
             "cf_api_url": api, "max_dns_wait": 30},
        )  # fmt: skip
        assert cred["cf_api_token"] == "cf-t...cdef" and cred["cf_api_url"] == api
        # bad input changes nothing: an unknown credential, a bad port, a field of another type
        r = await admin("AddZtDomain", {"domain": "cf.test", "dns_cred_id": "nope", "port": 443})
        assert r.status_code == 400 and "nope does not exist" in r.text
        r = await admin("AddZtDomain", {"domain": "cf.test", "dns_cred_id": cred["id"]})
        assert r.status_code == 400 and "port" in r.text
        r = await admin(
            "CreateDnsCredential",
            {"name": "x", "provider_type": "cloudflare", "cf_api_token": token,
             "rfc2136_server": "127.0.0.1:53"},
        )  # fmt: skip
        assert r.status_code == 400 and "cloudflare credentials have no" in r.text
        assert (await admin.ok("ListZtDomains")).get("domains", []) == []
        assert [c["id"] for c in (await admin.ok("ListDnsCredentials"))["credentials"]] == [
            cred["id"]
        ]

        # a DNS provider refusing the record: a clear error, no certificate, no record left
        mock.refuse = lambda body: "record quota exceeded" if body["type"] == "TXT" else None
        await admin.ok("AddZtDomain", {"domain": "cf.test", "dns_cred_id": cred["id"], "port": 443})
        refusals: list[str] = []

        async def refused() -> bool:  # the pass the new domain started may hold the lock first
            r = await admin("RenewZtDomainCert", {"domain": "cf.test"})
            if r.status_code == 200:
                assert r.json()["renewed"] is False
                return False
            refusals.append(r.text)
            return True

        await until(refused, "the refusal")
        assert "record quota exceeded" in refusals[0] and "400" in refusals[0], refusals
        status = (await admin.ok("GetZtDomain", {"domain": "cf.test"}))["cert_status"]
        assert status["has_cert"] is False and status["loaded_in_memory"] is False
        assert mock.records == {} and bind.query("_acme-challenge.cf.test", "TXT") == []
        async with gw.client() as c:
            info = await c.call("AcmeInfo", Empty(), gpb.AcmeInfoResponse)
        assert list(info.quoted_hist_keys) == []

        # the provider accepts again: the wildcard comes through the stand-in and is served
        mock.refuse = None

        async def renewed() -> bool:
            r = await admin("RenewZtDomainCert", {"domain": "cf.test"})
            return r.status_code == 200 and r.json()["renewed"] is True

        await until(renewed, "a renewal through the cloudflare stand-in")
        leaf = await served(gw, "gateway.cf.test", root)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["*.cf.test"]
        assert mock.records == {}
        assert all(token not in a for a in admin.answers)
    finally:
        await mock.stop()
