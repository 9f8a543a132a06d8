"""hash fields have their exact length: a 31-byte compose hash is never padded into a
whitelisted 32-byte one, by the attestation checker or by any authorization backend."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from aiohttp import web

from pydstack.attest.attestation import Attestation
from pydstack.attest.errors import VerifyError
from pydstack.attest.eventlog import RuntimeEvent
from pydstack.attest.verify import CollateralCache
from pydstack.kms.attestation import AttestationChecker
from pydstack.kms.auth import DevAuth, SimpleAuth, WebhookAuth
from pydstack.kms.bootinfo import BootInfo
from pydstack.kms.chain import BootInfoError, boot_tuple, bytes32
from pydstack.tee.simulated import SimulatedTdx

SEED = bytes.fromhex("5e" * 32)
SHORT = b"\x05" * 31  # its left-padded form, 00 || 05*31, is the whitelisted hash below
PADDED = SHORT.rjust(32, b"\0")
BOOT = BootInfo(
    tee_variant="dstack-tdx",
    mr_aggregated=b"\x01" * 32,
    os_image_hash=b"\x02" * 32,
    mr_system=b"\x03" * 32,
    app_id=b"\x04" * 20,
    compose_hash=PADDED,
    instance_id=b"\x06" * 20,
    device_id=b"\x07" * 32,
    key_provider_info=b"",
    tcb_status="UpToDate",
)
SHORT_BOOT = dataclasses.replace(BOOT, compose_hash=SHORT)


def test_length_error_names_the_field():
    assert BOOT.length_error() == ""
    assert SHORT_BOOT.length_error() == "compose hash must be 32 bytes, got 31"
    assert dataclasses.replace(BOOT, compose_hash=b"").length_error().startswith("compose hash")
    assert dataclasses.replace(BOOT, os_image_hash=b"").length_error() == ""  # absent is fine
    bad = dataclasses.replace(BOOT, mr_system=b"\x03" * 33)
    assert bad.length_error() == "mr system must be 32 bytes, got 33"
    bad = dataclasses.replace(BOOT, device_id=b"\x07" * 31)
    assert bad.length_error() == "device id must be 32 bytes, got 31"


async def test_simple_auth_denies_a_short_compose_hash(tmp_path):
    path = tmp_path / "allow.json"
    path.write_text(
        json.dumps(
            {
                "osImages": ["0x" + "02" * 32],
                "apps": {
                    "0x" + "04" * 20: {
                        # both spellings of the padded hash, and the short one itself
                        "composeHashes": ["0x" + PADDED.hex(), "0x" + SHORT.hex()],
                        "allowAnyDevice": True,
                    }
                },
            }
        )
    )
    auth = SimpleAuth(path)
    assert (await auth.is_app_allowed(BOOT)).is_allowed
    denied = await auth.is_app_allowed(SHORT_BOOT)
    assert (denied.is_allowed, denied.reason) == (False, "compose hash must be 32 bytes, got 31")


async def test_dev_auth_denies_a_short_compose_hash():
    auth = DevAuth("gw")
    assert (await auth.is_app_allowed(BOOT)).is_allowed
    denied = await auth.is_app_allowed(SHORT_BOOT)
    assert not denied.is_allowed and "compose hash must be 32 bytes" in denied.reason
    assert not (await auth.is_kms_allowed(SHORT_BOOT)).is_allowed


async def test_webhook_denies_a_short_compose_hash_without_asking():
    seen: list[dict] = []

    async def allow_all(request: web.Request) -> web.Response:
        seen.append(await request.json())
        return web.json_response({"isAllowed": True, "gatewayAppId": "gw", "reason": ""})

    app = web.Application()
    app.router.add_post("/bootAuth/app", allow_all)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        auth = WebhookAuth(f"http://127.0.0.1:{runner.addresses[0][1]}")
        assert (await auth.is_app_allowed(BOOT)).is_allowed
        denied = await auth.is_app_allowed(SHORT_BOOT)
        assert (denied.is_allowed, denied.reason) == (
            False,
            "compose hash must be 32 bytes, got 31",
        )
        assert len(seen) == 1  # the short one never reached the webhook
    finally:
        await runner.cleanup()


def test_eth_encoder_is_exact():
    assert boot_tuple(BOOT)[1] == PADDED
    with pytest.raises(BootInfoError, match="compose hash must be 32 bytes, got 31"):
        boot_tuple(SHORT_BOOT)
    for field, what in [
        ("device_id", "device id"),
        ("mr_aggregated", "mr aggregated"),
        ("mr_system", "mr system"),
        ("os_image_hash", "os image hash"),
    ]:
        with pytest.raises(BootInfoError, match=f"{what} must be 32 bytes"):
            boot_tuple(dataclasses.replace(BOOT, **{field: b"\x01" * 31}))
    with pytest.raises(BootInfoError, match="app id must be 20 bytes"):
        boot_tuple(dataclasses.replace(BOOT, app_id=b"\x04" * 19))
    assert boot_tuple(dataclasses.replace(BOOT, instance_id=b""))[2] == "0x" + "00" * 20
    with pytest.raises(BootInfoError, match="must be 32 bytes"):
        bytes32("01")
    assert bytes32("0x" + "ab" * 32) == b"\xab" * 32


def _attestation(tdx: SimulatedTdx, compose_hash: bytes) -> Attestation:
    for event in (
        RuntimeEvent("system-preparing", b""),
        RuntimeEvent("app-id", b"\x04" * 20),
        RuntimeEvent("compose-hash", compose_hash),
        RuntimeEvent("instance-id", b"\x06" * 20),
        RuntimeEvent("boot-mr-done", b""),
    ):
        tdx.extend_rtmr3(event)
    rd = hashlib.sha512(b"report").digest()
    return Attestation(
        tdx.get_quote(rd), tuple(tdx.event_log()), tuple(tdx.runtime_events()), rd, ""
    )


async def test_checker_refuses_a_31_byte_compose_hash_event():
    good_tdx, short_tdx = SimulatedTdx(SEED), SimulatedTdx(SEED)
    cache = CollateralCache(None)
    cache.put(good_tdx.pki.platform.fmspc.hex(), good_tdx.collateral_json())
    checker = AttestationChecker(cache, good_tdx.root_ca_der)
    boot = await checker.boot_info(_attestation(good_tdx, PADDED))  # the setup is sound
    assert boot.compose_hash == PADDED
    with pytest.raises(VerifyError, match="compose hash must be 32 bytes, got 31"):
        await checker.boot_info(_attestation(short_tdx, SHORT))
