"""the distributed certbot's decisions: when to renew, the lock, retries with backoff, the shared
account, attestation, rotation, AcmeInfo (ACME stood in by a local CA, DNS by memory)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from pydstack.certbot.certbot import (
    ROTATION_LOCK,
    Certbot,
    Outcome,
    RetryPolicy,
    cert_lock,
)
from pydstack.certbot.errors import (
    AcmeRefusedError,
    AcmeUnavailableError,
    CertbotError,
    CertbotInputError,
    DnsProviderError,
)
from pydstack.certbot.lock import MemoryDomainLock
from pydstack.certbot.model import (
    CertbotSettings,
    CloudflareProvider,
    DnsCredential,
    ZtDomainConfig,
)
from pydstack.certbot.storage import ACME_CREDENTIALS, KvCertStorage, MemoryKv

from .fakes import LocalCaBackend, MemoryDns
from .sim import SimAttester

URL = "https://acme.test/dir"


class Clock:
    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def env():
    kv = MemoryKv()
    storage = KvCertStorage(kv)
    await storage.put_settings(CertbotSettings(acme_url=URL, caa_issuer="ca.test"))
    await storage.put_dns_credential(DnsCredential("c1", "cf", CloudflareProvider("tok-abcdefgh1")))
    await storage.set_default_dns_credential("c1")
    await storage.put_zt_domain(ZtDomainConfig("a.test"))
    await storage.put_zt_domain(ZtDomainConfig("b.test"))
    dns = MemoryDns()
    backend = LocalCaBackend()
    clock = Clock()
    lock = MemoryDomainLock(clock)
    waits: list[float] = []

    async def sleep(d):
        waits.append(d)

    def bot(node=1, **kw):
        return Certbot(
            storage,
            lock,
            node_id=node,
            backend=backend,
            providers=lambda cfg, domain: dns,
            clock=clock,
            sleep=sleep,
            **kw,
        )

    return storage, kv, dns, backend, clock, lock, waits, bot


async def test_renews_when_missing_or_due_and_not_otherwise(env):
    storage, _, _, backend, clock, _, _, bot = env
    loaded = []

    async def on_cert(domain, data):
        loaded.append(domain)

    b = bot(on_cert=on_cert)
    assert await b.renew("A.test.") is Outcome.RENEWED
    assert await b.renew("a.test") is Outcome.FRESH
    assert backend.orders == ["a.test"] and loaded == ["a.test"]
    data = await storage.get_cert("a.test")
    # 30 days before expiry (the default) it is due again
    clock.now = data.not_after - 29 * 86400
    assert await b.renew("a.test") is Outcome.RENEWED
    assert backend.orders == ["a.test", "a.test"]
    assert await b.renew("a.test", force=True) is Outcome.RENEWED
    with pytest.raises(CertbotInputError, match=r"zt-domain c\.test does not exist"):
        await b.renew("c.test")


async def test_a_held_lock_skips_and_an_expired_one_is_taken_over(env):
    storage, _, _, backend, clock, lock, _, bot = env
    token = await lock.acquire(cert_lock("a.test"), "node-9", 600)
    assert token
    assert await bot(2).renew("a.test") is Outcome.LOCKED
    assert backend.orders == [] and await storage.get_cert("a.test") is None
    clock.now += 601
    assert await bot(2).renew("a.test") is Outcome.RENEWED
    assert (await storage.get_cert("a.test")).issued_by == 2
    # the dead holder's token no longer frees anything
    assert not await lock.release(cert_lock("a.test"), token)
    assert await lock.holder(cert_lock("a.test")) is None


async def test_acme_down_retries_with_backoff_then_keeps_the_old_certificate(env):
    storage, _, _, backend, _, lock, waits, bot = env
    b = bot(retry=RetryPolicy(attempts=4, first_delay=1, max_delay=3))
    await b.renew("a.test")
    old = await storage.get_cert("a.test")
    backend.down = 10
    with pytest.raises(AcmeUnavailableError, match="unreachable"):
        await b.renew("a.test", force=True)
    assert waits == [1, 2, 3]
    assert await storage.get_cert("a.test") == old
    assert await lock.holder(cert_lock("a.test")) is None
    # back up after two failures: renewed on the third try
    waits.clear()
    backend.down = 2
    assert await b.renew("a.test", force=True) is Outcome.RENEWED
    assert waits == [1, 2] and await storage.get_cert("a.test") != old


async def test_a_refused_order_or_dns_error_is_not_retried(env):
    storage, _, dns, backend, _, _, waits, bot = env
    backend.refuse = True
    with pytest.raises(AcmeRefusedError):
        await bot().renew("a.test")
    assert backend.orders == ["a.test"] and waits == []

    class Broken(LocalCaBackend):
        async def issue(self, *a, **kw):
            self.orders.append("x")
            raise DnsProviderError("cloudflare api POST /zones/z/dns_records: 400: quota")

    broken = Broken()
    b = Certbot(storage, MemoryDomainLock(), node_id=1, backend=broken,
                providers=lambda c, d: dns, sleep=bot().sleep)  # fmt: skip
    await storage.put_acme_credentials(await broken.create_account(URL))
    with pytest.raises(DnsProviderError, match="quota"):
        await b.renew("a.test")
    assert broken.orders == ["x"] and await storage.get_cert("a.test") is None


async def test_keys_and_the_account_are_attested_and_failures_do_not_block(env):
    storage, _, _, _, _, _, _, bot = env
    att = SimAttester()
    b = bot(attester=att)
    await b.renew("a.test")
    creds = await storage.get_acme_credentials()
    (a,) = await storage.list_cert_attestations("a.test")
    assert att.calls == [
        hashlib.sha512(b"acme-account:" + creds.account_id.encode()).digest(),
        hashlib.sha512(b"zt-cert:" + a.public_key).digest(),
    ]
    assert json.loads(a.quote)["report_data"] == att.calls[1].hex() and a.generated_by == 1
    assert (await storage.get_acme_attestation()).account_uri == creds.account_id
    att.fail = True
    assert await b.renew("a.test", force=True) is Outcome.RENEWED
    assert len(await storage.list_cert_attestations("a.test")) == 1
    info = await b.acme_info()
    assert info.account_uri == creds.account_id
    assert [k.public_key for k in info.quoted_hist_keys] == [a.public_key]
    assert info.to_json_obj(hex_prefix="0x")["quoted_hist_keys"][0]["public_key"] == (
        "0x" + a.public_key.hex()
    )


async def test_one_shared_account_and_its_directory_is_enforced(env):
    storage, kv, _, backend, _, lock, _, bot = env
    await bot(1).renew("a.test")
    await bot(2).renew("b.test")
    assert len(backend.accounts) == 1
    await storage.put_settings(CertbotSettings(acme_url="https://other.test/dir"))
    with pytest.raises(CertbotInputError, match="call RotateAcmeCredentials"):
        await bot().renew("a.test", force=True)
    kv.data[ACME_CREDENTIALS] = '{"account_id": 3}'
    with pytest.raises(CertbotInputError, match="corrupt acme credentials"):
        await bot().renew("a.test", force=True)
    # while another node makes the account, this one waits for the next round
    del kv.data[ACME_CREDENTIALS]
    await lock.acquire(ROTATION_LOCK, "node-5", 600)
    with pytest.raises(CertbotError, match="another node is creating the acme account"):
        await bot().renew("a.test", force=True)


async def test_rotation_checks_every_credential_first_then_repins_caa(env):
    storage, _, dns, backend, _, _, _, bot = env
    b = bot(attester=SimAttester())
    await b.renew("a.test")
    old = await storage.get_acme_credentials()
    dns.broken = True
    with pytest.raises(DnsProviderError):
        await b.rotate_acme_credentials()
    assert await storage.get_acme_credentials() == old and len(backend.accounts) == 1
    dns.broken = False
    result = await b.rotate_acme_credentials()
    new = await storage.get_acme_credentials()
    assert result.account_uri == new.account_id != old.account_id
    assert result.domains_updated == ["a.test", "b.test"] and result.failed == {}
    assert [(d, i) for _, d, i in backend.caa] == [("a.test", "ca.test"), ("b.test", "ca.test")]
    want = f"ca.test;validationmethods=dns-01;accounturi={new.account_id}"
    for domain in ("a.test", "b.test"):
        assert dns.contents("CAA", domain) == [f'0 issue "{want}"', f'0 issuewild "{want}"']
    assert (await storage.get_acme_attestation()).account_uri == new.account_id


async def test_renew_all_goes_on_past_a_failing_domain_and_run_stops(env):
    storage, _, _, _backend, _, _, _, bot = env
    await storage.put_zt_domain(ZtDomainConfig("c.test", "missing"))
    out = await bot().renew_all()
    assert out["a.test"] is Outcome.RENEWED and out["b.test"] is Outcome.RENEWED
    assert isinstance(out["c.test"], CertbotInputError)
    assert "dns credential missing of c.test does not exist" in str(out["c.test"])
    stop = asyncio.Event()
    b = bot()
    rounds = []
    real = b.renew_all

    async def counted(**kw):
        rounds.append(1)
        stop.set()
        return await real(**kw)

    b.renew_all = counted
    await b.run(stop)
    assert rounds == [1]
    loaded = await bot().load_certs()
    assert sorted(loaded) == ["a.test", "b.test"]


async def test_startup_waits_for_a_domain_renewed_elsewhere(env):
    _storage, _, _, _, _, lock, waits, bot = env
    await lock.acquire(cert_lock("b.test"), "node-4", 600)
    certs = await bot().init_all(wait=30)
    assert waits == [30] and sorted(certs) == ["a.test"]
