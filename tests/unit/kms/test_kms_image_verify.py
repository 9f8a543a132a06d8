"""`core.image.verify = true`: the KMS's checker accepts a sandbox CVM booted from the image it
claims (the VMM's own TD) and refuses one whose quote does not match, naming the register."""

from __future__ import annotations

import hashlib
import json

import pytest

from pydstack.attest.attestation import Attestation
from pydstack.attest.errors import VerifyError
from pydstack.attest.eventlog import RuntimeEvent, event_log_from_json
from pydstack.attest.verify import CollateralCache
from pydstack.kms.attestation import AttestationChecker
from pydstack.kms.config import KmsConfig
from pydstack.mr.store import ImageStore
from pydstack.mr.verify import OsImageVerifier
from pydstack.tee.simulated import SimulatedTdx
from pydstack.vmm.backends.sandbox.image import ensure_sandbox_image, sandbox_image_digest
from pydstack.vmm.td import TdIdentity, VmTd

SEED = bytes.fromhex("77" * 32)
VM_CONFIG = json.dumps({"os_image_hash": sandbox_image_digest(), "memory_size": 1 << 30})


def _cvm(tmp_path, os_image: str) -> Attestation:
    td = VmTd.fresh(SEED, TdIdentity(os_image, b"\x05" * 32), tmp_path / f"{os_image[:8]}.json")
    for ev in (
        RuntimeEvent("app-id", b"\x04" * 20),
        RuntimeEvent("compose-hash", b"\x05" * 32),
        RuntimeEvent("instance-id", b"\x06" * 20),
    ):
        td.extend_rtmr3(ev)
    rd = hashlib.sha512(b"kms").digest()
    quote, log = td.quote(rd)
    events = event_log_from_json(log)
    runtime = tuple(e.to_runtime_event() for e in events if e.is_runtime)
    return Attestation(quote, tuple(events), runtime, rd, VM_CONFIG)


@pytest.fixture
def checker(tmp_path):
    ensure_sandbox_image(tmp_path / "images")
    tdx = SimulatedTdx(SEED)
    cache = CollateralCache(None)
    cache.put(tdx.pki.platform.fmspc.hex(), tdx.collateral_json())
    images = OsImageVerifier(ImageStore(tmp_path / "images"))
    return AttestationChecker(cache, tdx.root_ca_der, images)


async def test_a_cvm_of_the_image_is_accepted(tmp_path, checker):
    boot = await checker.boot_info(_cvm(tmp_path, sandbox_image_digest()), vm_config=VM_CONFIG)
    assert boot.os_image_hash.hex() == sandbox_image_digest()


async def test_a_cvm_of_another_image_is_refused_naming_the_register(tmp_path, checker):
    att = _cvm(tmp_path, hashlib.sha256(b"other image").hexdigest())
    with pytest.raises(VerifyError, match=r"does not match the os image: mrtd \(expected"):
        await checker.boot_info(att, vm_config=VM_CONFIG)
    # without image verification the same claim passes: that is what verify = true adds
    plain = AttestationChecker(checker.collateral, checker.root_ca_der)
    assert (await plain.boot_info(att, vm_config=VM_CONFIG)).os_image_hash.hex() == (
        sandbox_image_digest()
    )
    # the kms's own attestation skips the image (as upstream)
    await checker.boot_info(att, vm_config=VM_CONFIG, check_image=False)


def test_config_accepts_image_verification(tmp_path):
    cfg = KmsConfig.from_toml(
        f'[core.image]\nverify = true\ncache_dir = "{tmp_path}"\n'
        'download_url = "http://127.0.0.1:1/mr_{OS_IMAGE_HASH}.tar.gz"\ndownload_timeout = "2m"\n'
    )
    assert cfg.image_verify and cfg.image_cache_dir == tmp_path
    assert cfg.image_download_timeout == 120.0
    assert KmsConfig.from_toml("").image_verify  # upstream's default
