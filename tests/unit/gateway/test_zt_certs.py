"""the certbot inside the gateway: stored certificates into the workers' store, the hook of a new
certificate, the background pass (retries while ACME is down, a kick), the admin's one-shot
renewal, AcmeInfo, the Admin methods (redaction, refusals that change nothing), the
``[core.certbot]`` section and ``build_certbot`` (ACME stood in by a local CA, DNS by memory)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.empty_pb2 import Empty

from pydstack.certbot.attest import AgentAttester
from pydstack.certbot.certbot import Certbot, Outcome, RetryPolicy
from pydstack.certbot.errors import AcmeUnavailableError
from pydstack.certbot.lock import FileDomainLock, MemoryDomainLock
from pydstack.certbot.model import (
    CertbotSettings,
    CertData,
    CloudflareProvider,
    DnsCredential,
    ZtDomainConfig,
)
from pydstack.certbot.storage import FileKv, KvCertStorage, MemoryKv
from pydstack.errors import ConfigError
from pydstack.gateway.certstore import CertStore
from pydstack.gateway.main import build_certbot, default_attester, local_certbot_store
from pydstack.gateway.settings import GatewayConfig
from pydstack.gateway.zt_admin import ZtAdminMethods
from pydstack.gateway.zt_certs import ZtCerts
from pydstack.rpc.json_codec import message_to_obj
from pydstack.rpc.proto import gateway_rpc_pb2 as pb
from pydstack.rpc.server import RpcError
from tests.unit.certbot.fakes import LocalCaBackend, MemoryDns
from tests.unit.certbot.sim import SimAttester

URL = "https://acme.test/dir"
TOKEN = "tok-0123456789abcdef"


class Env:
    def __init__(self) -> None:
        self.kv = MemoryKv()
        self.storage = KvCertStorage(self.kv)
        self.backend = LocalCaBackend()
        self.dns = MemoryDns()
        self.waits: list[float] = []
        self.published = 0
        self.certs = CertStore(("1.2", "1.3"))

        async def sleep(d: float) -> None:
            self.waits.append(d)

        self.bot = Certbot(
            self.storage,
            MemoryDomainLock(),
            node_id=3,
            attester=SimAttester(),
            backend=self.backend,
            providers=lambda cfg, domain: self.dns,
            retry=RetryPolicy(attempts=3, first_delay=1, max_delay=2),
            sleep=sleep,
        )

        async def changed() -> None:
            self.published += 1

        self.zt = ZtCerts(self.bot, self.certs, changed=changed, node_id=3, sync_interval=0.01)

    async def configure(self, *domains: str) -> None:
        await self.storage.put_settings(CertbotSettings(acme_url=URL))
        await self.storage.put_dns_credential(DnsCredential("c1", "cf", CloudflareProvider(TOKEN)))
        await self.storage.set_default_dns_credential("c1")
        for d in domains:
            await self.storage.put_zt_domain(ZtDomainConfig(d))


@pytest.fixture
async def env() -> Env:
    e = Env()
    await e.configure("a.test")
    return e


async def test_a_new_certificate_is_served_at_once_and_published(env: Env) -> None:
    assert env.certs.get("a.test") is None
    assert await env.bot.renew("a.test") is Outcome.RENEWED
    stored = await env.storage.get_cert("a.test")
    served = env.certs.get("a.test")
    assert stored is not None and served is not None
    assert served.chain_pem == stored.cert_pem and env.published == 1
    assert env.zt.loaded("a.test") and not env.zt.loaded("b.test")
    # the same certificate again changes nothing
    await env.zt.on_cert("a.test", stored)
    assert env.published == 1


async def test_sync_loads_what_another_process_stored_and_keeps_serving_on_a_bad_one(
    env: Env,
) -> None:
    other = Certbot(env.storage, MemoryDomainLock(), node_id=9, backend=env.backend,
                    providers=lambda cfg, domain: env.dns)  # fmt: skip
    await other.renew("a.test")
    assert env.certs.get("a.test") is None
    assert await env.zt.sync() == ["a.test"]
    first = env.certs.get("a.test")
    assert first is not None and env.published == 1
    assert await env.zt.sync() == []  # nothing new
    # a stored certificate whose key does not match is logged; the served one stays
    good = await env.storage.get_cert("a.test")
    assert good is not None
    await other.renew("a.test", force=True)
    newer = await env.storage.get_cert("a.test")
    assert newer is not None
    await env.storage.put_cert("a.test", dataclasses.replace(newer, key_pem=good.key_pem))
    assert await env.zt.sync() == []
    assert env.certs.get("a.test") is first


async def test_the_best_zt_domain_follows_priority_and_node(env: Env) -> None:
    await env.storage.put_zt_domain(ZtDomainConfig("b.test", priority=5, port=8443))
    await env.storage.put_zt_domain(ZtDomainConfig("c.test", priority=9, node=7))
    await env.zt.sync()
    assert env.zt.best is not None and env.zt.best.domain == "b.test"
    assert env.zt.best.port == 8443


async def test_the_background_pass_retries_while_acme_is_down_then_serves(env: Env) -> None:
    await env.bot.account()
    env.backend.down = 2
    stop = asyncio.Event()
    task = asyncio.ensure_future(env.zt.run(stop))

    async def served() -> None:
        while env.certs.get("a.test") is None:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(served(), 30)
    assert env.waits == [1, 2] and env.backend.orders == ["a.test"] * 3
    # a kick starts a pass at once: a domain added later gets its certificate
    await env.storage.put_zt_domain(ZtDomainConfig("b.test"))
    env.zt.kick()

    async def served_b() -> None:
        while env.certs.get("b.test") is None:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(served_b(), 30)
    stop.set()
    await asyncio.wait_for(task, 30)


async def test_the_admins_renewal_tries_once_and_keeps_the_old_certificate(env: Env) -> None:
    assert await env.zt.renew_now("a.test") is Outcome.RENEWED
    before = env.certs.get("a.test")
    env.backend.down = 5
    with pytest.raises(AcmeUnavailableError):
        await env.zt.renew_now("a.test", force=True)
    assert env.waits == [] and env.certs.get("a.test") is before
    assert env.backend.orders == ["a.test", "a.test"]


async def test_acme_info_lists_every_attested_key(env: Env) -> None:
    assert await env.zt.acme_info() == pb.AcmeInfoResponse()
    await env.bot.renew("a.test")
    await env.bot.renew("a.test", force=True)
    info = await env.zt.acme_info()
    creds = await env.storage.get_acme_credentials()
    assert creds is not None and info.account_uri == creds.account_id
    assert info.account_quote and info.account_attestation
    hist = await env.storage.list_cert_attestations("a.test")
    assert [k.public_key for k in info.quoted_hist_keys] == [a.public_key for a in hist]
    assert len(hist) == 2


class Admin(ZtAdminMethods):
    def __init__(self, zt: ZtCerts | None) -> None:
        self.zt = zt


async def test_admin_credentials_are_redacted_and_bad_input_changes_nothing(env: Env) -> None:
    admin = Admin(env.zt)
    call: Any = None
    created = await admin.CreateDnsCredential(
        pb.CreateDnsCredentialRequest(
            name="bind",
            provider_type="rfc2136",
            rfc2136_server="127.0.0.1:5353",
            rfc2136_tsig_key_name="k.",
            rfc2136_tsig_secret="c2VjcmV0LXNlY3JldC1zZWNyZXQ=",
            set_as_default=True,
        ),
        call,
    )
    assert created.rfc2136_tsig_secret == "c2Vj...ZXQ=" and created.rfc2136_server.endswith("5353")
    answers = [
        await admin.ListDnsCredentials(Empty(), call),
        await admin.GetDnsCredential(pb.GetDnsCredentialRequest(id="c1"), call),
        await admin.GetDefaultDnsCredential(Empty(), call),
    ]
    text = json.dumps([message_to_obj(a) for a in answers])
    assert TOKEN not in text and "c2VjcmV0LXNlY3JldC1zZWNyZXQ=" not in text
    assert answers[2].default_id == created.id and answers[2].credential.id == created.id
    # refusals: a field of the other provider, a missing credential, a bad domain
    before = dict(env.kv.data)
    with pytest.raises(Exception, match="cloudflare credentials have no"):
        await admin.CreateDnsCredential(
            pb.CreateDnsCredentialRequest(
                name="x", provider_type="cloudflare", cf_api_token=TOKEN, rfc2136_zone="a.test"
            ),
            call,
        )
    with pytest.raises(Exception, match="nope does not exist"):
        bad = pb.ZtDomainConfig(domain="b.test", dns_cred_id="nope", port=443)
        await admin.AddZtDomain(bad, call)
    with pytest.raises(Exception, match="port"):
        await admin.AddZtDomain(pb.ZtDomainConfig(domain="b.test"), call)
    assert env.kv.data == before


async def test_admin_zt_domains_settings_and_renewal(env: Env) -> None:
    admin = Admin(env.zt)
    call: Any = None
    info = await admin.AddZtDomain(
        pb.ZtDomainConfig(domain="*.B.test.", port=443, priority=2),
        call,
    )
    assert info.config.domain == "b.test" and not info.config.HasField("dns_cred_id")
    assert not info.cert_status.has_cert
    out = await admin.RenewZtDomainCert(pb.RenewZtDomainCertRequest(domain="b.test"), call)
    assert out.renewed and out.not_after > 0
    got = await admin.GetZtDomain(pb.GetZtDomainRequest(domain="b.test"), call)
    assert got.cert_status.has_cert and got.cert_status.loaded_in_memory
    assert got.cert_status.issued_by == 3
    hist = await admin.ListCertAttestations(pb.ListCertAttestationsRequest(domain="b.test"), call)
    assert hist.HasField("latest") and len(hist.history) == 1
    await admin.SetCertbotConfig(
        pb.SetCertbotConfigRequest(renew_interval_secs=60, caa_issuer="pebble"),
        call,
    )
    cfg = await admin.GetCertbotConfig(Empty(), call)
    assert cfg.renew_interval_secs == 60 and cfg.caa_issuer == "pebble" and cfg.acme_url == URL
    listed = await admin.ListZtDomains(Empty(), call)
    assert [d.config.domain for d in listed.domains] == ["a.test", "b.test"]
    await admin.DeleteZtDomain(pb.DeleteZtDomainRequest(domain="b.test"), call)
    with pytest.raises(Exception, match="does not exist"):
        await admin.GetZtDomain(pb.GetZtDomainRequest(domain="b.test"), call)


async def test_admin_refuses_everything_without_a_certbot() -> None:
    with pytest.raises(RpcError, match="certbot is disabled"):
        await Admin(None).ListZtDomains(Empty(), None)  # type: ignore[arg-type]


def _config(tmp_path: Path, certbot: str) -> GatewayConfig:
    return GatewayConfig.from_dict(
        {
            "tls": {"key": "k", "certs": "c"},
            "core": {"certbot": json.loads(certbot), "sync": {"data_dir": str(tmp_path)}},
        },
        base=tmp_path,
    )


def test_the_certbot_section_and_build_certbot(tmp_path: Path) -> None:
    assert _config(tmp_path, "{}").certbot.enabled
    cfg = _config(
        tmp_path,
        '{"acme_ca_bundle": "roots.pem", "dns_resolvers": ["127.0.0.1:5353"], "enabled": true}',
    )
    assert cfg.certbot.acme_ca_bundle == tmp_path / "roots.pem"
    assert cfg.certbot.dns_resolvers == ("127.0.0.1:5353",)
    with pytest.raises(ConfigError, match=r"core\.certbot\.dns_resolvers"):
        _config(tmp_path, '{"dns_resolvers": ["ns.example.com"]}')
    kv, lock = local_certbot_store(tmp_path)
    assert isinstance(kv, FileKv) and isinstance(lock, FileDomainLock)
    with pytest.raises(ConfigError, match="acme_ca_bundle"):
        build_certbot(cfg, kv, lock)
    (tmp_path / "roots.pem").write_text("roots")
    bot = build_certbot(cfg, kv, lock)
    assert bot.node_id == 0 and bot.attester is None


async def test_the_local_store_is_private_and_survives_a_new_instance(tmp_path: Path) -> None:
    kv, _ = local_certbot_store(tmp_path)
    storage = KvCertStorage(kv)
    await storage.put_cert("a.test", CertData("chain", "key", 2e9, 1, 1.0))
    assert oct((tmp_path / "certbot.json").stat().st_mode)[-3:] == "600"
    again, _ = local_certbot_store(tmp_path)
    got = await KvCertStorage(again).get_cert("a.test")
    assert got is not None and got.key_pem == "key"


def test_keys_are_attested_only_with_a_guest_agent(tmp_path: Path) -> None:
    missing = _config(tmp_path, json.dumps({"agent": str(tmp_path / "no-agent.sock")}))
    assert default_attester(missing) is None
    http = _config(tmp_path, '{"agent": "http://127.0.0.1:8090"}')
    assert isinstance(default_attester(http), AgentAttester)
