"""RegisterCvm's caller identity: from the app-info extension the KMS signs, else from the
certificate's attestation through the evidence verifier; every certificate that cannot say who
it is refused; the auth webhook admits only on 2xx."""

from __future__ import annotations

import pytest
from aiohttp import web
from cryptography import x509

from pydstack.attest.attestation import Attestation, to_versioned_bytes
from pydstack.attest.eventlog import RuntimeEvent
from pydstack.attest.evidence import Verification
from pydstack.attest.report_data import ratls_report_data
from pydstack.crypto.certs import generate_p256_key, spki_der
from pydstack.gateway.identity import (
    NO_APP_INFO,
    AuthDenied,
    AuthWebhook,
    IdentityError,
    caller_identity,
    identity_of,
)
from pydstack.tee.simulated import SimulatedTdx
from tests.gateway_pki import KmsPki, app_info, random_hex

APP, INSTANCE = random_hex(), random_hex()


def leaf(chain: str) -> x509.Certificate:
    return x509.load_pem_x509_certificates(chain.encode())[0]


@pytest.fixture(scope="module")
def pki() -> KmsPki:
    return KmsPki()


async def test_the_app_info_extension_names_the_caller(pki: KmsPki) -> None:
    chain, _ = pki.client_cert(app_info(APP, INSTANCE, "ab" * 32))
    who = await caller_identity(leaf(chain), None)
    assert (who.app_id, who.instance_id, who.compose_hash) == (APP, INSTANCE, "ab" * 32)
    assert who.webhook_body()["mr_aggregated"] == "02" * 32


async def test_an_app_id_that_contradicts_the_app_info_is_refused(pki: KmsPki) -> None:
    chain, _ = pki.client_cert(app_info(APP, INSTANCE), app_id=bytes.fromhex(random_hex()))
    with pytest.raises(IdentityError, match="app id is not its app info"):
        await caller_identity(leaf(chain), None)


async def test_no_certificate_or_one_that_says_nothing_is_refused(pki: KmsPki) -> None:
    with pytest.raises(IdentityError, match="client authentication is required"):
        await caller_identity(None, None)
    chain, _ = pki.client_cert(None)
    with pytest.raises(IdentityError, match=NO_APP_INFO):
        await caller_identity(leaf(chain), None)


async def test_empty_ids_are_refused(pki: KmsPki) -> None:
    info = app_info(APP, INSTANCE)
    from dataclasses import replace

    chain, _ = pki.client_cert(replace(info, instance_id=b""))
    with pytest.raises(IdentityError, match="app_id or instance_id is empty"):
        await caller_identity(leaf(chain), None)
    with pytest.raises(IdentityError, match="empty"):
        identity_of(replace(info, app_id=b""))


def attested_cert(pki: KmsPki, *, bind: bool = True) -> x509.Certificate:
    tdx = SimulatedTdx(bytes.fromhex("44" * 32))
    tdx.extend_rtmr3(RuntimeEvent("app-id", bytes.fromhex(APP)))
    tdx.extend_rtmr3(RuntimeEvent("instance-id", bytes.fromhex(INSTANCE)))
    tdx.extend_rtmr3(RuntimeEvent("compose-hash", b"\x07" * 32))
    key = generate_p256_key()
    rd = ratls_report_data(spki_der(key.public_key() if bind else generate_p256_key().public_key()))
    att = Attestation(
        quote=tdx.get_quote(rd),
        event_log=tuple(tdx.event_log()),
        runtime_events=tuple(tdx.runtime_events()),
        report_data=rd,
        config="{}",
    )
    chain, _ = pki.client_cert(
        None, app_id=bytes.fromhex(APP), attestation=to_versioned_bytes(att), key=key
    )
    return leaf(chain)


class FakeVerifier:
    def __init__(self, ok: bool) -> None:
        self.ok = ok
        self.calls = 0

    async def verify(self, att: Attestation, **_: object) -> Verification:
        self.calls += 1
        v = Verification(image_required=False)
        if self.ok:
            from pydstack.attest.identity import AppInfo

            v.quote_verified = v.event_log_verified = True
            v.app_info = AppInfo.from_attestation(att, boottime_mr=False)
        else:
            v.fail("quote", "signature chain does not verify")
        return v


async def test_an_attested_certificate_is_verified_before_it_is_believed(pki: KmsPki) -> None:
    cert = attested_cert(pki)
    good = FakeVerifier(True)
    who = await caller_identity(cert, good)  # type: ignore[arg-type]
    assert (who.app_id, who.instance_id, who.compose_hash) == (APP, INSTANCE, "07" * 32)
    assert good.calls == 1
    with pytest.raises(IdentityError, match="attestation refused: quote: signature chain"):
        await caller_identity(cert, FakeVerifier(False))  # type: ignore[arg-type]
    with pytest.raises(IdentityError, match="no verifier"):
        await caller_identity(cert, None)
    skipped = await caller_identity(cert, None, skip_attestation=True)
    assert skipped.instance_id == INSTANCE


async def test_an_attestation_for_another_key_is_refused(pki: KmsPki) -> None:
    with pytest.raises(IdentityError, match="not bound to its quote"):
        await caller_identity(attested_cert(pki, bind=False), FakeVerifier(True))  # type: ignore[arg-type]


async def test_the_webhook_admits_only_on_2xx(pki: KmsPki) -> None:
    seen: list[dict] = []
    status = [200]

    async def handler(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.Response(status=status[0])

    app = web.Application()
    app.router.add_post("/auth", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        chain, _ = pki.client_cert(app_info(APP, INSTANCE))
        who = await caller_identity(leaf(chain), None)
        hook = AuthWebhook(f"http://127.0.0.1:{port}/auth", 5)
        await hook.check(who)
        assert seen[-1]["app_id"] == APP and seen[-1]["instance_id"] == INSTANCE
        status[0] = 403
        with pytest.raises(AuthDenied, match="answered 403"):
            await hook.check(who)
    finally:
        await runner.cleanup()
    with pytest.raises(AuthDenied, match="unreachable"):
        await AuthWebhook(f"http://127.0.0.1:{port}/auth", 2).check(who)
