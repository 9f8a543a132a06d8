"""backend failures reach callers as a short reason, the detail goes to the log; a webhook that
is neither https nor loopback is warned about at start."""

from __future__ import annotations

import logging

import pytest
from google.protobuf.empty_pb2 import Empty

from pydstack.attest.verify import CollateralCache
from pydstack.devstack import free_port
from pydstack.kms.attestation import AttestationChecker
from pydstack.kms.auth import WebhookAuth
from pydstack.kms.bootinfo import BootInfo
from pydstack.kms.keys import KeyStore
from pydstack.kms.service import KmsService, KmsState
from pydstack.rpc.server import CallContext, RpcError

BOOT = BootInfo(
    tee_variant="dstack-tdx",
    mr_aggregated=b"\x01" * 32,
    os_image_hash=b"\x02" * 32,
    mr_system=b"\x03" * 32,
    app_id=b"\x04" * 20,
    compose_hash=b"\x05" * 32,
    instance_id=b"\x06" * 20,
    device_id=b"\x07" * 32,
    key_provider_info=b"",
    tcb_status="UpToDate",
)
WARNING = "neither https nor loopback"


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("http://10.1.2.3:9", True),
        ("http://auth-api:8000", True),
        ("ftp://127.0.0.1/", True),
        ("https://auth.example:8443/x", False),
        ("http://127.0.0.1:8000", False),
        ("http://127.3.4.5", False),
        ("http://localhost:1", False),
        ("http://[::1]:8000", False),
    ],
)
def test_plain_http_webhook_is_warned_about_at_start(caplog, url, warned):
    caplog.set_level(logging.WARNING, logger="pydstack.kms.auth")
    WebhookAuth(url)
    lines = [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]
    assert len(lines) == (1 if warned else 0), lines


def test_the_warning_carries_no_credentials(caplog):
    caplog.set_level(logging.WARNING, logger="pydstack.kms.auth")
    WebhookAuth("http://kms:s3cret-token@10.1.2.3:9/auth?key=s3cret-query")
    assert WARNING in caplog.text and "10.1.2.3:9" in caplog.text
    assert "s3cret" not in caplog.text


async def test_dead_webhook_denial_names_no_host(caplog):
    caplog.set_level(logging.WARNING, logger="pydstack.kms.auth")
    port = free_port()
    auth = WebhookAuth(f"http://kms:s3cret@127.0.0.1:{port}")
    for decision in (await auth.is_app_allowed(BOOT), await auth.is_kms_allowed(BOOT)):
        assert (decision.is_allowed, decision.reason) == (False, "auth api unavailable")
    assert f"127.0.0.1:{port}" in caplog.text  # the operator sees where and why
    assert "s3cret" not in caplog.text


async def test_get_meta_hides_the_auth_api_failure(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    port = free_port()
    keys = KeyStore(tmp_path / "certs").generate("kms.local")
    state = KmsState(
        keys=keys,
        auth=WebhookAuth(f"http://127.0.0.1:{port}"),
        checker=AttestationChecker(CollateralCache(None)),
        cert_dir=tmp_path / "certs",
    )
    with pytest.raises(RpcError) as err:
        await KmsService(state).GetMeta(Empty(), CallContext(None, None, None))
    assert str(err.value) == "auth api info failed"
    assert str(port) not in str(err.value)
    assert f"127.0.0.1:{port}" in caplog.text
