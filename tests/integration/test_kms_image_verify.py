"""dstack-kms with `core.image.verify = true`: a CVM gets keys only when its quote's MRTD and
RTMR0-2 are what the OS image it claims measures (real processes, RA-TLS)."""

from __future__ import annotations

import hashlib
import json

import pytest

from pydstack.guest.instance import InstanceInfo
from pydstack.guest.kms_client import get_app_keys
from pydstack.guest.measure import measure_stage1
from pydstack.mr.image import SANDBOX_MEASUREMENT
from pydstack.rpc.server import RpcError
from pydstack.tee.simulated import SimulatedTdx, synthetic_measurements

from .kms_proc import OS_IMAGE, SEED, Pccs, allowlist, start_kms, write_config
from .test_kms_keys import COMPOSE, VM_CONFIG, App

DIGEST = hashlib.sha256(OS_IMAGE.encode()).hexdigest()


def sim_image(path):
    """the simulator's image as an image directory: its digest and the measurement its TD has."""
    path.mkdir(parents=True)
    (path / "metadata.json").write_text(json.dumps({"kind": "sandbox", "version": "0.1.0"}))
    (path / "digest.txt").write_text(DIGEST)
    names = ("mrtd", "rtmr0", "rtmr1", "rtmr2")
    values = dict(zip(names, (v.hex() for v in synthetic_measurements(OS_IMAGE)), strict=True))
    (path / SANDBOX_MEASUREMENT).write_text(json.dumps({"os_image_hash": DIGEST, **values}))


@pytest.fixture(scope="module")
def kms(tmp_path_factory):
    d = tmp_path_factory.mktemp("kms-image")
    pccs = Pccs(d / "root.der")
    sim_image(d / "images" / "pydstack-sim")
    compose_hash = hashlib.sha256(COMPOSE).hexdigest()
    allowlist(
        d / "allow.json",
        os_images=[DIGEST, "ab" * 32],
        apps={compose_hash[:40]: {"composeHashes": [compose_hash], "allowAnyDevice": True}},
    )
    proc = start_kms(
        write_config(d, pccs.url, d / "root.der", d / "allow.json", image_cache=d / "images")
    )
    yield proc
    proc.stop()
    pccs.stop()


async def test_a_cvm_of_the_claimed_image_gets_its_keys(kms):
    keys, _ = await get_app_keys(kms.url, App().attest, VM_CONFIG)
    assert len(keys.disk_crypt_key) == 32


async def test_a_cvm_of_another_image_is_refused_naming_the_register(kms):
    app = App()
    app.tdx = SimulatedTdx(SEED, os_image="another-image")  # claims OS_IMAGE in its vm_config
    measure_stage1(app.tdx, COMPOSE, InstanceInfo(b"\x01" * 20))
    with pytest.raises(RpcError) as err:
        await get_app_keys(kms.url, app.attest, VM_CONFIG)
    assert str(err.value).startswith(
        "attestation refused: the quote does not match the os image: mrtd (expected"
    ), str(err.value)


async def test_an_image_the_kms_does_not_have_is_refused(kms):
    with pytest.raises(RpcError, match="not in the image cache"):
        await get_app_keys(kms.url, App().attest, json.dumps({"os_image_hash": "ab" * 32}))
