"""replication: a new KMS obtains the root keys from a running one over mutually attested TLS.

The receiver checks the source's RA-TLS server certificate (attestation bound to its key, DCAP
verified, BootInfo allowed by the receiver's own auth backend as a KMS), then presents its own
RA-TLS client certificate (signed by the source's temp CA, carrying the receiver's attestation)
to `GetKmsKey`; the source verifies it and asks its auth backend before releasing the keys.
"""

from __future__ import annotations

import logging

import httpx
from cryptography import x509
from google.protobuf.empty_pb2 import Empty

from pydstack.attest.ratls import verify_cert_binding
from pydstack.attest.report_data import ratls_report_data
from pydstack.crypto.certs import load_key_pem, ra_tls_client_cert
from pydstack.rpc.client import PrpcClient
from pydstack.rpc.proto import kms_rpc_pb2 as pb
from pydstack.rpc.server import RpcError

from .attestation import AttestationChecker
from .auth import AuthBackend
from .keys import KeyStore, KmsKeys

log = logging.getLogger(__name__)


def _agent(path: str) -> httpx.Client:
    if path.startswith(("http://", "https://")):
        return httpx.Client(base_url=path, timeout=30)
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=path), base_url="http://localhost", timeout=30
    )


def agent_attest(agent: str, report_data: bytes) -> bytes:
    """this CVM's versioned attestation over `report_data`, from its guest agent."""
    with _agent(agent) as c:
        r = c.post("/Attest", json={"report_data": report_data.hex()})
    if r.status_code != 200:
        raise RpcError(f"guest agent Attest failed: {r.text[:200]}")
    return bytes.fromhex(r.json()["attestation"])


def agent_vm_config(agent: str) -> str:
    with _agent(agent) as c:
        r = c.post("/Info", json={})
    if r.status_code != 200:
        raise RpcError(f"guest agent Info failed: {r.text[:200]}")
    return str(r.json().get("vm_config", ""))


def ratls_attestation(agent: str, public_key_spki: bytes) -> bytes:
    return agent_attest(agent, ratls_report_data(public_key_spki))


async def onboard(
    source_url: str,
    store: KeyStore,
    domain: str,
    *,
    agent: str,
    checker: AttestationChecker,
    auth: AuthBackend,
    attest_rpc_cert: bool,
) -> KmsKeys:
    if store.any_root():
        raise ValueError("this KMS already has root keys; refusing to onboard over them")
    base = source_url.rstrip("/").removesuffix("/prpc")
    seen: list[x509.Certificate] = []
    async with PrpcClient(base, prefix="/prpc", verify_server=seen.append) as plain:
        tmp = await plain.call("GetTempCaCert", Empty(), pb.GetTempCaCertResponse)
    if not seen:
        raise RpcError("source kms presented no certificate")
    source_att = verify_cert_binding(seen[0])
    source_boot = await checker.boot_info(source_att)
    decision = await auth.is_kms_allowed(source_boot)
    if not decision.is_allowed:
        raise RpcError(f"source KMS is not allowed: {decision.reason}")
    client_cert, client_key = ra_tls_client_cert(
        tmp.temp_ca_cert, tmp.temp_ca_key, lambda spki: ratls_attestation(agent, spki)
    )
    async with PrpcClient(
        base,
        prefix="/prpc",
        client_cert_pem=client_cert,
        client_key_pem=client_key,
        verify_server=lambda c: None,
    ) as mtls:
        resp = await mtls.call(
            "GetKmsKey", pb.GetKmsKeyRequest(vm_config=agent_vm_config(agent)), pb.KmsKeyResponse
        )
    if len(resp.keys) != 1:
        raise RpcError(f"source kms returned {len(resp.keys)} key sets, expected exactly one")
    root_ca = load_key_pem(resp.keys[0].ca_key)
    log.info("onboarded root keys from %s", base)
    attest = (lambda spki: ratls_attestation(agent, spki)) if attest_rpc_cert else None
    return store.store(
        root_ca, resp.keys[0].k256_key, load_key_pem(resp.temp_ca_key), domain, attest
    )
