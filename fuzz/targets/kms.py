"""the target of `pydstack.kms`: the SignCert request path, end to end in process."""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fuzz import mutators as m
from fuzz.harness import Target
from fuzz.targets import common as c
from fuzz.targets.attest import _collateral
from fuzz.targets.crypto import csr_seeds
from pydstack.attest.verify import CollateralCache
from pydstack.crypto.csr import CONFIRM
from pydstack.kms.attestation import AttestationChecker
from pydstack.kms.auth import DevAuth
from pydstack.kms.keys import KmsKeys, ca_certs, rpc_cert
from pydstack.kms.service import KmsService, KmsState
from pydstack.rpc.errors import RpcError
from pydstack.rpc.proto import kms_rpc_pb2 as pb
from pydstack.rpc.server import CallContext


def _make_sign_cert() -> Callable[[bytes], object]:
    logging.getLogger("pydstack").setLevel(logging.CRITICAL)
    root_key, tmp_key, rpc_key = c.key("kms-root"), c.key("kms-tmp"), c.key("kms-rpc")
    root_cert, tmp_cert = ca_certs(root_key, tmp_key)
    keys = KmsKeys(
        root_ca_key=root_key,
        root_ca_cert=root_cert,
        root_k256=bytes(range(32)),
        tmp_ca_key=tmp_key,
        tmp_ca_cert=tmp_cert,
        rpc_key=rpc_key,
        rpc_cert=rpc_cert("kms.fuzz", rpc_key, root_key, root_cert),
    )
    cache = CollateralCache(None)
    pki = c.cvm().tdx.pki
    cache.put(pki.platform.fmspc.hex(), _collateral())
    state = KmsState(
        keys=keys,
        auth=DevAuth(),
        checker=AttestationChecker(cache, root_ca_der=pki.root_ca_der),
        cert_dir=Path(tempfile.mkdtemp(prefix="fuzz-kms-")),
    )
    service = KmsService(state)
    signer = c.key("csr")
    loop = asyncio.new_event_loop()
    ctx = CallContext(None, None, None)

    def call(data: bytes) -> None:
        signature = signer.sign(data, ec.ECDSA(hashes.SHA256()))
        req = pb.SignCertRequest(
            api_version=2, csr=data, signature=signature, vm_config=c.VM_CONFIG
        )
        loop.run_until_complete(service.SignCert(req, ctx))

    return call


KMS_SIGN_CERT = Target(
    name="kms_sign_cert",
    doc="`kms/service.py::KmsService.SignCert`: CSR decoding and signature, the attestation, "
    "its binding, DCAP verification under the mock root, identity, and the issued certificate",
    make=_make_sign_cert,
    allowed=(RpcError,),
    seeds=csr_seeds,
    mutators=(*m.SCALE, m.msgpack_length),
    tokens=(b"\x44" + CONFIRM.encode(), b"\x00", b"\x01"),
    max_len=32 * 1024,
)

TARGETS: Sequence[Target] = (KMS_SIGN_CERT,)
