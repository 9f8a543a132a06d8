"""SignCert refuses what a certificate cannot carry with an RpcError, not a handler error
(a fuzzing finding: a CSR whose not_before is after its not_after raised ValueError, a 500)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from pydstack.attest.attestation import Attestation, encode_v0, stripped
from pydstack.attest.report_data import ratls_report_data
from pydstack.attest.verify import CollateralCache
from pydstack.crypto.certs import generate_p256_key, spki_der
from pydstack.crypto.csr import CONFIRM, CertConfigV2, CertSigningRequestV2
from pydstack.guest.instance import InstanceInfo
from pydstack.guest.measure import measure_stage1
from pydstack.kms.attestation import AttestationChecker
from pydstack.kms.auth import DevAuth
from pydstack.kms.keys import KeyStore
from pydstack.kms.service import KmsService, KmsState
from pydstack.rpc.proto import kms_rpc_pb2 as pb
from pydstack.rpc.server import CallContext, RpcError
from pydstack.tee.collateral import make_collateral
from pydstack.tee.simulated import SimulatedTdx

SEED = hashlib.sha256(b"sign-cert test").digest()
OS_IMAGE = "sign-cert-image"
VM_CONFIG = json.dumps({"os_image_hash": hashlib.sha256(OS_IMAGE.encode()).hexdigest()})
GOOD = CertConfigV2(None, "app.example", ("app.example",), True, False, ext_quote=True)


@pytest.fixture(scope="module")
def kms(tmp_path_factory):
    tdx = SimulatedTdx(SEED, os_image=OS_IMAGE)
    measure_stage1(tdx, b'{"name":"sign-cert"}', InstanceInfo(b"\x01" * 20))
    cache = CollateralCache(None)
    cache.put(tdx.pki.platform.fmspc.hex(), make_collateral(tdx.pki).to_qvl_json())
    d = tmp_path_factory.mktemp("kms")
    state = KmsState(
        keys=KeyStore(d / "certs").generate("kms.local"),
        auth=DevAuth(),
        checker=AttestationChecker(cache, root_ca_der=tdx.pki.root_ca_der),
        cert_dir=d / "certs",
    )
    return tdx, KmsService(state)


async def _sign(kms, config: CertConfigV2) -> pb.SignCertResponse:
    tdx, service = kms
    key = generate_p256_key()
    spki = spki_der(key.public_key())
    rd = ratls_report_data(spki)
    att = Attestation(
        tdx.get_quote(rd), tuple(tdx.event_log()), tuple(tdx.runtime_events()), rd, VM_CONFIG
    )
    csr = CertSigningRequestV2(CONFIRM, spki, config, encode_v0(stripped(att)))
    req = pb.SignCertRequest(
        api_version=2, csr=csr.encode(), signature=csr.sign(key), vm_config=VM_CONFIG
    )
    return await service.SignCert(req, CallContext(None, None, None))


async def test_a_valid_csr_gets_a_certificate_chain(kms):
    resp = await _sign(kms, GOOD)
    assert len(resp.certificate_chain) == 3


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"not_before": 2_000_000_000, "not_after": 1_000_000_000}, "not_before must be earlier"),
        ({"not_after": 2**63}, "validity must lie between 1970 and 9999"),
        ({"subject_alt_names": ("caf\u00e9.example",)}, "is not ascii"),
    ],
)
async def test_what_no_certificate_can_carry_is_an_invalid_csr(kms, change, why):
    with pytest.raises(RpcError, match=f"invalid csr: .*{why}"):
        await _sign(kms, dataclasses.replace(GOOD, **change))
