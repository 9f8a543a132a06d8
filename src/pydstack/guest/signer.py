"""certificate signers for the agent's TLS keys."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.crypto.certs import (
    CertRequest,
    cert_pem,
    issue_cert,
    load_cert_pem,
    load_key_pem,
    spki_der,
)
from pydstack.crypto.csr import CONFIRM, CertConfigV2, CertSigningRequestV2
from pydstack.rpc.proto import kms_rpc_pb2 as kpb

from .appkeys import AppKeys
from .kms_client import _prpc_url, ra_tls_client

#: the versioned attestation for a key's SPKI (report_data = sha512("ratls-cert:" || spki))
CertAttest = Callable[[bytes], bytes]


class LocalCertSigner:
    """signs with the CA in `.appkeys.json` (key providers none/local/tpm, and the simulator):
    usage `app:custom`, chain `[leaf, ca]`."""

    def __init__(self, keys: AppKeys) -> None:
        if not keys.key_provider.key_pem or not keys.ca_cert:
            raise ValueError("appkeys carry no local ca key to sign certificates with")
        self.ca_key = load_key_pem(keys.key_provider.key_pem)
        self.ca_cert = load_cert_pem(keys.ca_cert)
        self.ca_pem = cert_pem(self.ca_cert)

    def sign(self, req: CertRequest, key: ec.EllipticCurvePrivateKey) -> list[str]:
        req = dataclasses.replace(req, special_usage="app:custom")
        leaf = issue_cert(req, key.public_key(), self.ca_key, self.ca_cert)
        return [cert_pem(leaf), self.ca_pem]


class KmsCertSigner:
    """asks the KMS to sign (key provider kms): `SignCert{api_version 2, csr, signature,
    vm_config}` over RA-TLS; the KMS checks the CSR's attestation and authorization and signs
    with the app's CA, so the chain is `[leaf, app ca, kms root ca]`."""

    def __init__(self, keys: AppKeys, vm_config: str, attest: CertAttest) -> None:
        provider = keys.key_provider
        if provider.kind != "Kms":
            raise ValueError("the kms signer needs keys from a kms")
        self.url = _prpc_url(str(provider.fields["url"]))
        self.tmp_ca_cert = str(provider.fields["tmp_ca_cert"])
        self.tmp_ca_key = str(provider.fields["tmp_ca_key"])
        self.vm_config = vm_config
        self.attest = attest

    def sign(self, req: CertRequest, key: ec.EllipticCurvePrivateKey) -> list[str]:
        pub = spki_der(key.public_key())
        csr = CertSigningRequestV2(
            confirm=CONFIRM,
            pubkey=pub,
            config=CertConfigV2(
                org_name=req.org_name,
                subject=req.subject,
                subject_alt_names=tuple(req.alt_names),
                usage_server_auth=req.usage_server_auth,
                usage_client_auth=req.usage_client_auth,
                ext_quote=req.attestation is not None,
                ext_app_info=req.app_info is not None,
                not_before=req.not_before,
                not_after=req.not_after,
            ),
            attestation=req.attestation or self.attest(pub),
        )
        signature = csr.sign(key)
        # callers are synchronous (agent handlers run in worker threads); the rpc is async
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self._call(csr.encode(), signature)).result()

    async def _call(self, csr: bytes, signature: bytes) -> list[str]:
        async with ra_tls_client(self.url, self.tmp_ca_cert, self.tmp_ca_key, self.attest) as kms:
            resp = await kms.call(
                "SignCert",
                kpb.SignCertRequest(
                    api_version=2, csr=csr, signature=signature, vm_config=self.vm_config
                ),
                kpb.SignCertResponse,
            )
        return list(resp.certificate_chain)
