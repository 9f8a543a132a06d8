"""the certbot against a real pebble and a real bind9: wildcard certificates by DNS-01 through
RFC 2136 and through the Cloudflare API stand-in, CAA, attestation, and the faults (a provider
refusing a record, the ACME server down, the lock holder dying)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pydstack.certbot.certbot import Certbot, LibAcmeBackend, Outcome, RetryPolicy, cert_lock
from pydstack.certbot.cfmock import CfMock, zone_id
from pydstack.certbot.devdns import DevPebble
from pydstack.certbot.errors import AcmeUnavailableError, DnsProviderError
from pydstack.certbot.lock import FileDomainLock, MemoryDomainLock
from pydstack.certbot.model import (
    CertbotSettings,
    CloudflareProvider,
    DnsCredential,
    Rfc2136Provider,
    ZtDomainConfig,
)
from pydstack.certbot.rfc2136 import Rfc2136Dns
from pydstack.certbot.storage import FileKv, KvCertStorage, MemoryKv

from ..unit.certbot.sim import SimAttester
from .conftest import acme_options


def _options(bind, pebble):
    return acme_options(bind, pebble)


async def _setup(storage, domain, provider, pebble, *, cred_id="c1"):
    await storage.put_settings(CertbotSettings(acme_url=pebble.directory_url, caa_issuer="pebble"))
    await storage.put_dns_credential(DnsCredential(cred_id, "test", provider, max_dns_wait=30))
    await storage.put_zt_domain(ZtDomainConfig(domain, cred_id))


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_chain(chain_pem: str, key_pem: str, root_pem: str, domain: str) -> x509.Certificate:
    certs = x509.load_pem_x509_certificates(chain_pem.encode())
    leaf = certs[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [f"*.{domain}"]
    root = x509.load_pem_x509_certificate(root_pem.encode())
    for child, parent in zip(certs, [*certs[1:], root], strict=True):
        child.verify_directly_issued_by(parent)
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    assert _spki(leaf) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return leaf


async def test_rfc2136_wildcard_from_pebble_attested_and_renewed_with_a_fresh_key(bind, pebble):
    storage = KvCertStorage(MemoryKv())
    await _setup(storage, "example.test", bind.provider(), pebble)
    attester = SimAttester()
    loaded = {}

    async def on_cert(domain, data):
        loaded[domain] = data

    bot = Certbot(
        storage,
        MemoryDomainLock(),
        node_id=1,
        attester=attester,
        backend=LibAcmeBackend(_options(bind, pebble)),
        on_cert=on_cert,
    )
    assert await bot.renew("example.test") is Outcome.RENEWED
    data = await storage.get_cert("example.test")
    leaf = _check_chain(data.cert_pem, data.key_pem, pebble.root_pem(), "example.test")
    assert data.not_after == leaf.not_valid_after_utc.timestamp() and data.issued_by == 1
    assert loaded["example.test"] == data
    # the challenge records are gone from the zone
    assert bind.query("_acme-challenge.example.test", "TXT") == []
    # the key is attested: sha512("zt-cert:" + spki) in the quote, the account too
    (att,) = await storage.list_cert_attestations("example.test")
    assert att.public_key == _spki(leaf)
    rd = hashlib.sha512(b"zt-cert:" + _spki(leaf)).digest()
    assert json.loads(att.quote)["report_data"] == rd.hex()
    creds = await storage.get_acme_credentials()
    acc = await storage.get_acme_attestation()
    assert acc.account_uri == creds.account_id and creds.acme_url == pebble.directory_url
    assert hashlib.sha512(b"acme-account:" + creds.account_id.encode()).digest() in attester.calls
    # not due: nothing happens; forced: a new certificate with a new key, one more attestation
    assert await bot.renew("example.test") is Outcome.FRESH
    assert await bot.renew("example.test", force=True) is Outcome.RENEWED
    again = await storage.get_cert("example.test")
    leaf2 = _check_chain(again.cert_pem, again.key_pem, pebble.root_pem(), "example.test")
    assert _spki(leaf2) != _spki(leaf)
    hist = await storage.list_cert_attestations("example.test")
    assert [a.public_key for a in hist] == [_spki(leaf2), _spki(leaf)]
    # the same account was used both times
    assert (await storage.get_acme_credentials()) == creds
    info = (await bot.acme_info()).to_json_obj()
    assert info["account_uri"] == creds.account_id
    assert {k["public_key"] for k in info["quoted_hist_keys"]} == {
        _spki(leaf).hex(),
        _spki(leaf2).hex(),
    }


async def test_caa_pins_the_ca_the_method_and_the_account(bind, pebble):
    storage = KvCertStorage(MemoryKv())
    await _setup(storage, "example.test", bind.provider(), pebble)
    dns = Rfc2136Dns(bind.provider(), "example.test")
    stale = await dns.add_caa("example.test", 0, "issue", "other-ca.example")
    bot = Certbot(
        storage, MemoryDomainLock(), node_id=1, backend=LibAcmeBackend(_options(bind, pebble))
    )
    await bot.set_caa("example.test")
    uri = (await storage.get_acme_credentials()).account_id
    want = f"pebble;validationmethods=dns-01;accounturi={uri}"
    assert bind.query("example.test", "CAA") == sorted(
        [f'0 issue "{want}"', f'0 issuewild "{want}"']
    )
    # again: nothing changes (no duplicates, no guard left)
    await bot.set_caa("example.test")
    assert len(bind.query("example.test", "CAA")) == 2
    await dns.delete_record(stale)


async def test_cloudflare_api_records_reach_the_dns_pebble_asks(bind, pebble):
    mock = CfMock(("test", "cf.test"), tokens=("tok-123456789",))
    mock.backend = Rfc2136Dns(bind.provider(), "cf.test")
    api = await mock.start()
    try:
        storage = KvCertStorage(MemoryKv())
        await _setup(storage, "cf.test", CloudflareProvider("tok-123456789", api), pebble)
        bot = Certbot(
            storage, MemoryDomainLock(), node_id=2, backend=LibAcmeBackend(_options(bind, pebble))
        )
        assert await bot.renew("cf.test") is Outcome.RENEWED
        data = await storage.get_cert("cf.test")
        _check_chain(data.cert_pem, data.key_pem, pebble.root_pem(), "cf.test")
        created = [p for m, p in mock.requests if m == "POST"]
        deleted = [p for m, p in mock.requests if m == "DELETE"]
        assert created == [f"/client/v4/zones/{zone_id('cf.test')}/dns_records"]
        assert len(deleted) == 1 and mock.records == {}
        assert bind.query("_acme-challenge.cf.test", "TXT") == []
    finally:
        await mock.stop()


async def test_a_refused_record_is_a_clear_error_and_leaves_nothing(bind, pebble):
    mock = CfMock(("cf.test",))
    mock.backend = Rfc2136Dns(bind.provider(), "cf.test")
    api = await mock.start()
    try:
        storage = KvCertStorage(MemoryKv())
        await _setup(storage, "cf.test", CloudflareProvider("a-secret-token-value", api), pebble)
        mock.refuse = lambda body: "record quota exceeded" if body["type"] == "TXT" else None
        bot = Certbot(
            storage, MemoryDomainLock(), node_id=1, backend=LibAcmeBackend(_options(bind, pebble))
        )
        with pytest.raises(DnsProviderError) as err:
            await bot.renew("cf.test")
        assert "400" in str(err.value) and "record quota exceeded" in str(err.value)
        assert "a-secret-token-value" not in str(err.value)
        assert await storage.get_cert("cf.test") is None
        assert mock.records == {} and bind.query("_acme-challenge.cf.test", "TXT") == []
        # the lock was released: a later attempt is not blocked
        assert await bot.lock.holder(cert_lock("cf.test")) is None
    finally:
        await mock.stop()


async def test_rfc2136_with_a_wrong_tsig_key_is_refused_without_the_secret(bind, pebble):
    storage = KvCertStorage(MemoryKv())
    bad = Rfc2136Provider(bind.server, bind.key_name, "d3JvbmctYnV0LWxvbmctZW5vdWdoLXNlY3JldA==")
    await _setup(storage, "example.test", bad, pebble)
    bot = Certbot(
        storage, MemoryDomainLock(), node_id=1, backend=LibAcmeBackend(_options(bind, pebble))
    )
    with pytest.raises(DnsProviderError) as err:
        await bot.renew("example.test")
    assert "tsig" in str(err.value) or "NOTAUTH" in str(err.value)
    assert bad.tsig_secret not in str(err.value)
    assert await storage.get_cert("example.test") is None


async def test_acme_server_down_retries_with_backoff_and_keeps_the_old_certificate(bind, tmp_path):
    own = DevPebble.start(tmp_path / "pebble", bind.server)
    storage = KvCertStorage(MemoryKv())
    try:
        await _setup(storage, "down.test", bind.provider(), own)
        waits = []

        async def sleep(delay):
            waits.append(delay)

        bot = Certbot(
            storage,
            MemoryDomainLock(),
            node_id=1,
            backend=LibAcmeBackend(_options(bind, own)),
            retry=RetryPolicy(attempts=4, first_delay=0.5, max_delay=1.5),
            sleep=sleep,
        )
        assert await bot.renew("down.test") is Outcome.RENEWED
        before = await storage.get_cert("down.test")
    finally:
        own.stop()
    with pytest.raises(AcmeUnavailableError) as err:
        await bot.renew("down.test", force=True)
    assert "unreachable" in str(err.value)
    assert waits == [0.5, 1.0, 1.5]
    assert await storage.get_cert("down.test") == before
    assert bind.query("_acme-challenge.down.test", "TXT") == []


LOCK_HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from pydstack.certbot.lock import FileDomainLock

    async def main():
        token = await FileDomainLock(Path(sys.argv[1])).acquire(sys.argv[2], "node-7", 600)
        print("held" if token else "refused", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_the_lock_of_a_dead_holder_expires_and_another_node_renews(bind, pebble, tmp_path):
    storage = KvCertStorage(FileKv(tmp_path / "state.json"))
    await _setup(storage, "lock.test", bind.provider(), pebble)
    lock_file = tmp_path / "locks.json"
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(lock_file), cert_lock("lock.test")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.kill()
        holder.wait()
    now = [0.0]
    import time

    base = time.time()

    def clock():
        return base + now[0]

    bot = Certbot(
        storage,
        FileDomainLock(lock_file, clock=clock),
        node_id=2,
        backend=LibAcmeBackend(_options(bind, pebble)),
        clock=clock,
    )
    # the dead node's lock is still live: this node skips the domain
    assert await bot.renew("lock.test") is Outcome.LOCKED
    assert (await bot.lock.holder(cert_lock("lock.test"))).holder == "node-7"
    assert await storage.get_cert("lock.test") is None
    # its time runs out: this node takes the lock and renews
    now[0] = 601.0
    assert await bot.renew("lock.test") is Outcome.RENEWED
    data = await storage.get_cert("lock.test")
    assert data.issued_by == 2
    _check_chain(data.cert_pem, data.key_pem, pebble.root_pem(), "lock.test")
    assert await bot.lock.holder(cert_lock("lock.test")) is None
