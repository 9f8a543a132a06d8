"""kms authorization backends and derivations (unit level: our own logic)."""

from __future__ import annotations

import json
import logging

import pytest
from aiohttp import web

from pydstack.crypto.kdf import p256_key_from_bytes
from pydstack.errors import ConfigError
from pydstack.kms.auth import DevAuth, SimpleAuth, WebhookAuth
from pydstack.kms.bootinfo import BootInfo
from pydstack.kms.config import KmsConfig
from pydstack.kms.derive import derive_app_keys, env_public_key

BOOT = BootInfo(
    tee_variant="dstack-tdx",
    mr_aggregated=b"\x01" * 32,
    os_image_hash=b"\x02" * 32,
    mr_system=b"\x03" * 32,
    app_id=b"\x04" * 20,
    compose_hash=b"\x05" * 32,
    instance_id=b"\x06" * 20,
    device_id=b"\x07" * 32,
    key_provider_info=b'{"name":"kms"}',
    tcb_status="UpToDate",
    advisory_ids=("INTEL-SA-1",),
)


def test_bootinfo_json_is_camel_case_hex():
    obj = BOOT.to_json_obj()
    assert list(obj) == [
        "teeVariant",
        "mrAggregated",
        "osImageHash",
        "mrSystem",
        "appId",
        "composeHash",
        "instanceId",
        "deviceId",
        "keyProviderInfo",
        "tcbStatus",
        "advisoryIds",
    ]
    assert obj["appId"] == "04" * 20 and obj["keyProviderInfo"] == b'{"name":"kms"}'.hex()
    assert BootInfo.from_json_obj(obj) == BOOT


async def test_dev_auth_allows_and_warns(caplog):
    caplog.set_level(logging.WARNING)
    auth = DevAuth("gw")
    d = await auth.is_app_allowed(BOOT)
    assert d.is_allowed and d.gateway_app_id == "gw"
    assert "without any policy" in caplog.text and "never use in production" in caplog.text


async def test_simple_auth_rules_and_reload(tmp_path):
    path = tmp_path / "allow.json"
    auth = SimpleAuth(path)
    assert (await auth.is_app_allowed(BOOT)).reason == "advisory ID is not allowed"  # missing file
    base = {
        "gatewayAppId": "gw",
        "osImages": ["0x" + "02" * 32],
        "allowedTcbStatuses": ["UpToDate"],
        "allowedAdvisoryIds": ["INTEL-SA-1"],
        "apps": {
            "0x" + "04" * 20: {"composeHashes": ["0x" + "05" * 32], "devices": ["0x" + "08" * 32]}
        },
        "kms": {"mrAggregated": ["0x" + "01" * 32], "devices": [], "allowAnyDevice": False},
    }
    path.write_text(json.dumps(base))
    d = await auth.is_app_allowed(BOOT)
    assert (d.is_allowed, d.reason) == (False, "app is not allowed to boot on this device")
    assert (await auth.is_kms_allowed(BOOT)).is_allowed  # empty device list means any device
    base["apps"]["0x" + "04" * 20]["allowAnyDevice"] = True
    import os
    import time

    path.write_text(json.dumps(base))
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert (await auth.is_app_allowed(BOOT)).is_allowed
    import dataclasses

    cases = [
        (dataclasses.replace(BOOT, tcb_status="OutOfDate"), "TCB status is not allowed"),
        (dataclasses.replace(BOOT, advisory_ids=("X",)), "advisory ID is not allowed"),
        (dataclasses.replace(BOOT, os_image_hash=b"\x09" * 32), "OS image is not allowed"),
        (dataclasses.replace(BOOT, app_id=b"\x09" * 20), "app not registered"),
        (dataclasses.replace(BOOT, compose_hash=b"\x09" * 32), "compose hash not allowed"),
    ]
    for boot, reason in cases:
        assert (await auth.is_app_allowed(boot)).reason == reason
    assert (
        await auth.is_kms_allowed(dataclasses.replace(BOOT, mr_aggregated=b"\x09" * 32))
    ).reason == ("aggregated MR not allowed")


async def test_webhook_protocol_and_fail_closed():
    seen: list[tuple[str, dict]] = []
    mode = {"status": 200, "body": {"isAllowed": True, "gatewayAppId": "gw", "reason": ""}}

    async def boot_auth(request: web.Request) -> web.Response:
        seen.append((request.path, await request.json()))
        return web.json_response(mode["body"], status=mode["status"])

    async def info(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "kmsContractAddr": "0x1",
                "chainId": 7,
                "gatewayAppId": "gw",
                "appImplementation": "0x2",
            }
        )

    app = web.Application()
    app.router.add_post("/bootAuth/app", boot_auth)
    app.router.add_post("/bootAuth/kms", boot_auth)
    app.router.add_get("/", info)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        auth = WebhookAuth(f"http://127.0.0.1:{port}")
        assert (await auth.is_app_allowed(BOOT)).is_allowed
        assert (await auth.is_kms_allowed(BOOT)).gateway_app_id == "gw"
        assert [p for p, _ in seen] == ["/bootAuth/app", "/bootAuth/kms"]
        assert seen[0][1] == BOOT.to_json_obj()
        assert (await auth.info())["chainId"] == 7
        mode["body"] = {"isAllowed": False, "gatewayAppId": "", "reason": "nope"}
        assert (await auth.is_app_allowed(BOOT)).reason == "nope"
        mode["body"] = {"unexpected": True}
        d = await auth.is_app_allowed(BOOT)
        assert not d.is_allowed and "invalid response" in d.reason
        mode["status"] = 500
        assert "http 500" in (await auth.is_app_allowed(BOOT)).reason
    finally:
        await runner.cleanup()
    down = await WebhookAuth(f"http://127.0.0.1:{port}").is_app_allowed(BOOT)
    assert not down.is_allowed and "unavailable" in down.reason


def test_key_epochs():
    root = p256_key_from_bytes(bytes(31) + b"\x05")
    k256 = bytes(31) + b"\x07"
    e0 = derive_app_keys(root, k256, b"\x01" * 20, b"\x02" * 20)
    assert e0 == derive_app_keys(root, k256, b"\x01" * 20, b"\x02" * 20, epoch=0)
    e1 = derive_app_keys(root, k256, b"\x01" * 20, b"\x02" * 20, epoch=1)
    assert e1.k256_key != e0.k256_key and e1.disk_crypt_key != e0.disk_crypt_key
    assert e1 == derive_app_keys(root, k256, b"\x01" * 20, b"\x02" * 20, epoch=1)
    assert (
        env_public_key(root, k256, b"\x01" * 20, 1).public_key
        != env_public_key(root, k256, b"\x01" * 20).public_key
    )
    with pytest.raises(ValueError, match="20 bytes"):
        derive_app_keys(root, k256, b"\x01" * 3, b"")


def test_config_fails_closed():
    base = "[core.image]\nverify = false\n"
    assert KmsConfig.from_toml(base).auth_type == "webhook"
    assert KmsConfig.from_toml(base).max_concurrent_fetches == 4
    fetches = base + "[core.attestation]\nmax_concurrent_fetches = 2\n"
    assert KmsConfig.from_toml(fetches).max_concurrent_fetches == 2
    for bad, msg in [
        (
            '[core.image]\ndownload_url = "https://images.example/x.tar.gz"\n',
            "must contain {OS_IMAGE_HASH}",
        ),
        ('[core.image]\ndownload_timeout = "soon"\n', "invalid duration"),
        (base + '[core.auth_api]\ntype = "magic"\n', "not supported"),
        (
            base + '[core.attestation.root_ca]\ntdx = "/x"\n',
            "insecure_allow_external_trust_anchors",
        ),
        (base + '[core.auth_api]\ntype = "eth"\n', "rpc_url, kms_contract and chain_id"),
        ("[core\n", "invalid kms config"),
        (base + "[core.attestation]\nmax_concurrent_fetches = 0\n", "max_concurrent_fetches"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            KmsConfig.from_toml(bad)
