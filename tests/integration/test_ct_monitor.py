"""dstack-ct-monitor against a local RFC 6962 log fed with real certificates: pebble-issued ones
the certbot attested, one pebble issued to an unattested key, a precertificate from another CA,
and one for an unrelated domain. The gateway's acme-info is served the way the gateway does; the
keys' evidence is verified by the evidence path (in process) and by a dstack-verifier."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import subprocess
import sys

import httpx
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pydstack.certbot.acme_client import AcmeAccount
from pydstack.certbot.acme_info import LocalKeyVerifier
from pydstack.certbot.certbot import Certbot, LibAcmeBackend
from pydstack.certbot.ct_monitor import CtMonitor
from pydstack.certbot.ctlog import CtError, load_log_key
from pydstack.certbot.devctlog import DevCtLog
from pydstack.certbot.lock import MemoryDomainLock
from pydstack.certbot.model import CertbotSettings, DnsCredential, ZtDomainConfig
from pydstack.certbot.rfc2136 import Rfc2136Dns
from pydstack.certbot.storage import KvCertStorage, MemoryKv
from pydstack.tee.simulated import SimulatedTdx
from pydstack.vmm.backends.sandbox.image import ensure_sandbox_image

from ..unit.certbot.sim import SEED, SimAttester, sim_verifier
from .conftest import acme_options
from .kms_proc import _wait


def _ders(chain_pem: str) -> list[bytes]:
    return [
        c.public_bytes(serialization.Encoding.DER)
        for c in x509.load_pem_x509_certificates(chain_pem.encode())
    ]


def _precert(domain: str) -> list[bytes]:
    """a precertificate for `*.domain` from a CA that is not pebble, and that CA."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rogue ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    pre = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"*.{domain}")]), False)
        .add_extension(x509.PrecertPoison(), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return [
        pre.public_bytes(serialization.Encoding.DER),
        ca.public_bytes(serialization.Encoding.DER),
    ]


@pytest.fixture(scope="module")
def world(bind, pebble, tmp_path_factory):
    """the certbot's attested certificates, the rogue ones, a log with all of them, the
    gateway's acme-info on http, and a verifier config for the simulated TD."""
    d = tmp_path_factory.mktemp("ct")

    async def build():
        storage = KvCertStorage(MemoryKv())
        await storage.put_settings(CertbotSettings(acme_url=pebble.directory_url))
        await storage.put_dns_credential(
            DnsCredential("c", "bind", bind.provider(), max_dns_wait=30)
        )
        await storage.put_zt_domain(ZtDomainConfig("example.test", "c"))
        await storage.put_zt_domain(ZtDomainConfig("other.test", "c"))
        bot = Certbot(
            storage,
            MemoryDomainLock(),
            node_id=1,
            attester=SimAttester(),
            backend=LibAcmeBackend(acme_options(bind, pebble)),
        )
        await bot.renew("example.test")
        first = (await storage.get_cert("example.test")).cert_pem
        await bot.renew("example.test", force=True)
        second = (await storage.get_cert("example.test")).cert_pem
        await bot.renew("other.test")
        other = (await storage.get_cert("other.test")).cert_pem
        # the shared account used outside the certbot: a certificate nobody attested
        account = AcmeAccount(await storage.get_acme_credentials(), acme_options(bind, pebble))
        rogue = await account.issue(
            "example.test", Rfc2136Dns(bind.provider(), "example.test"), max_dns_wait=30
        )
        return bot, [first, second, other], rogue.chain_pem

    bot, attested, rogue = asyncio.run(build())
    tdx = SimulatedTdx(SEED)
    (d / "collateral.json").write_text(tdx.collateral_json())
    (d / "root.der").write_bytes(tdx.root_ca_der)
    ensure_sandbox_image(d / "images")
    (d / "verifier.toml").write_text(
        f"""address = "127.0.0.1"
port = 0
image_cache_dir = "{d / "images"}"
image_download_url = ""

[attestation]
insecure_allow_external_trust_anchors = true
collateral_files = ["{d / "collateral.json"}"]

[attestation.urls]
pccs = ""

[attestation.root_ca]
tdx = "{d / "root.der"}"
"""
    )
    return bot, attested, rogue, d


async def _serve_info(bot, *, prefix="0x"):
    async def info(_):
        return web.json_response((await bot.acme_info()).to_json_obj(hex_prefix=prefix))

    app = web.Application()
    app.router.add_get("/.dstack/acme-info", info)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/.dstack/acme-info"


async def _log_with(world, *, rogue=True, page=3):
    _bot, attested, rogue_pem, _ = world
    ct = DevCtLog(page=page)
    for pem in attested:
        ct.add(_ders(pem))
    if rogue:
        ct.add(_ders(rogue_pem))
        ct.add(_precert("example.test"), precert=True)
    url = await ct.start()
    return ct, url


async def test_unattested_certificates_are_flagged_and_attested_ones_are_not(world, tmp_path):
    bot, _attested, rogue_pem, _ = world
    ct, log_url = await _log_with(world)
    runner, info_url = await _serve_info(bot)
    try:
        async with httpx.AsyncClient() as client:
            mon = CtMonitor(
                log_url,
                "example.test",
                info_url,
                LocalKeyVerifier(sim_verifier(tmp_path / "images")),
                client=client,
                log_key=load_log_key(ct.public_key_pem()),
            )
            findings = await mon.poll_once()
            rogue_leaf = x509.load_pem_x509_certificate(rogue_pem.encode())
            assert [(f.index, f.entry_type, f.names) for f in findings] == [
                (3, "x509", ["*.example.test"]),
                (4, "precert", ["*.example.test"]),
            ]
            assert findings[0].serial == format(rogue_leaf.serial_number, "x")
            assert findings[1].issuer == "CN=rogue ca"
            # nothing new: nothing flagged again
            assert await mon.poll_once() == []
            assert mon.tree.size == 5
    finally:
        await runner.cleanup()
        await ct.stop()


async def test_a_log_that_lies_about_its_entries_or_its_key_is_an_error(world, tmp_path):
    bot, *_ = world
    ct, log_url = await _log_with(world, rogue=False)
    runner, info_url = await _serve_info(bot, prefix="")
    verifier = LocalKeyVerifier(sim_verifier(tmp_path / "images"))
    try:
        async with httpx.AsyncClient() as client:
            other_key = DevCtLog().public_key_pem()
            mon = CtMonitor(
                log_url, "example.test", info_url, verifier, client=client,
                log_key=load_log_key(other_key),
            )  # fmt: skip
            with pytest.raises(CtError, match="does not verify under the log key"):
                await mon.poll_once()
            ct.tamper(1, ct.leaves[0])
            mon = CtMonitor(log_url, "example.test", info_url, verifier, client=client)
            with pytest.raises(CtError, match="do not match the signed tree head"):
                await mon.poll_once()
            assert mon.tree.size == 0
    finally:
        await runner.cleanup()
        await ct.stop()


def _monitor(args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "pydstack.certbot.ct_monitor", *args],
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


async def test_the_command_exits_non_zero_and_runs_the_alert_hook(world, tmp_path):
    bot, _, _, d = world
    ct, log_url = await _log_with(world)
    runner, info_url = await _serve_info(bot)
    (tmp_path / "log.pem").write_bytes(ct.public_key_pem())
    alerts = tmp_path / "alerts.jsonl"
    common = [
        "--log-url", log_url, "--log-key", str(tmp_path / "log.pem"), "--domain", "example.test",
        "--gateway", info_url, "--once", "--state", str(tmp_path / "state.json"),
    ]  # fmt: skip
    try:
        out = await asyncio.to_thread(
            _monitor,
            [*common, "--verifier-config", str(d / "verifier.toml"),
             "--alert-command", f"cat >> {alerts}; echo >> {alerts}"],
        )  # fmt: skip
        assert out.returncode == 1, out.stderr
        found = [json.loads(line) for line in alerts.read_text().splitlines() if line]
        assert [(f["index"], f["entry_type"]) for f in found] == [(3, "x509"), (4, "precert")]
        assert found[0]["alert"] == "certificate issued to an unattested public key"
        # the position is kept: a second run has nothing new
        out = await asyncio.to_thread(
            _monitor, [*common, "--verifier-config", str(d / "verifier.toml")]
        )
        assert out.returncode == 0, out.stderr
        # through a dstack-verifier: a log with the attested certificates only is clean
        verifier = subprocess.Popen(
            [sys.executable, "-m", "pydstack.verifier.main", "-c", str(d / "verifier.toml")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            vurl = _wait(verifier, "listening on").split()[-1]
            clean, clean_url = await _log_with(world, rogue=False)
            try:
                out = await asyncio.to_thread(
                    _monitor,
                    ["--log-url", clean_url, "--domain", "example.test", "--gateway", info_url,
                     "--once", "--verifier-url", vurl],
                )  # fmt: skip
                assert out.returncode == 0, out.stderr
                assert "checked 3 log entries" in out.stderr
            finally:
                await clean.stop()
        finally:
            verifier.terminate()
            verifier.communicate(timeout=10)
    finally:
        await runner.cleanup()
        await ct.stop()


async def test_a_history_whose_evidence_does_not_verify_fails_closed(world, tmp_path):
    bot, *_ = world
    ct, log_url = await _log_with(world, rogue=False)

    async def info(_):
        obj = (await bot.acme_info()).to_json_obj()
        for k in obj["quoted_hist_keys"]:  # each key claims another key's evidence
            k["public_key"] = base64.b16encode(b"\x30" + bytes(90)).decode().lower()
        return web.json_response(obj)

    app = web.Application()
    app.router.add_get("/.dstack/acme-info", info)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/.dstack/acme-info"
    try:
        async with httpx.AsyncClient() as client:
            mon = CtMonitor(
                log_url, "example.test", url, LocalKeyVerifier(sim_verifier(tmp_path / "i")),
                client=client,
            )  # fmt: skip
            with pytest.raises(Exception, match="none of the gateway's attested keys verifies"):
                await mon.poll_once()
    finally:
        await runner.cleanup()
        await ct.stop()
