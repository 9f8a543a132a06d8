"""replication: a new KMS obtains the root keys from a running one over mutually attested TLS.

The receiver checks the source's RA-TLS server certificate (attestation bound to its key, DCAP
verified, BootInfo allowed by the receiver's own auth backend as a KMS), then presents its own
RA-TLS client certificate (signed by the source's temp CA, carrying the receiver's attestation)
to `GetKmsKey`; the source verifies it and asks its auth backend before releasing the keys.

Every connection to the source is pinned to the key of the first one (:class:`SourcePin`): the
certificate that was attested is the only one any later connection may present, so a proxy that
sends the key request elsewhere is refused before a byte of it is sent. What the source returns
must also hang together: its temp CA certificate and key match, its TLS certificate is signed by
the CA it reports, and the root key it releases is that CA's key. Nothing is stored unless all
of this holds.
"""

from __future__ import annotations

import hashlib
import logging

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.empty_pb2 import Empty

from pydstack.attest.ratls import verify_cert_binding
from pydstack.attest.report_data import ratls_report_data
from pydstack.crypto.certs import load_cert_pem, load_key_pem, ra_tls_client_cert
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


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class SourcePin:
    """the source KMS's TLS key: taken from the first connection, demanded of every later one.

    Use `check` as the `verify_server` of every client that talks to the source. Raises RpcError
    ("source kms key mismatch ...") for a connection presenting any other key; the connection is
    closed before a request goes out on it.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.cert: x509.Certificate | None = None
        self.spki: bytes | None = None

    def check(self, cert: x509.Certificate) -> None:
        spki = _spki(cert)
        if self.spki is None:
            self.cert, self.spki = cert, spki
            return
        if spki != self.spki:
            got = hashlib.sha256(spki).hexdigest()[:16]
            pinned = hashlib.sha256(self.spki).hexdigest()[:16]
            raise RpcError(
                f"source kms key mismatch: a connection to {self.url} presented tls key "
                f"{got} instead of the attested source key {pinned}; refusing to onboard"
            )


def _same_key(a: object, b: object) -> bool:
    return (
        isinstance(a, ec.EllipticCurvePublicKey)
        and isinstance(b, ec.EllipticCurvePublicKey)
        and a.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
        == b.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    )


def _source_ca(tmp: pb.GetTempCaCertResponse, server_cert: x509.Certificate) -> x509.Certificate:
    """the source's root CA certificate, after checking its GetTempCaCert answer hangs together:
    the temp CA key matches its certificate and the source's TLS certificate is signed by the
    root CA it reports. Raises RpcError."""
    try:
        temp_cert, temp_key = load_cert_pem(tmp.temp_ca_cert), load_key_pem(tmp.temp_ca_key)
        ca = load_cert_pem(tmp.ca_cert)
    except ValueError as e:
        raise RpcError(f"source kms sent an unusable temp ca or ca certificate: {e}") from e
    if not _same_key(temp_cert.public_key(), temp_key.public_key()):
        raise RpcError("source kms temp ca key does not match its temp ca certificate")
    try:
        server_cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as e:
        raise RpcError("source kms tls certificate is not issued by the ca it reports") from e
    return ca


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
    """replicate the root keys of the KMS at `source_url` into `store` and return them.

    Raises ValueError when `store` already holds root keys; RpcError when the source is not
    attested and allowed, when any connection presents another key than the attested one
    ("source kms key mismatch"), or when its answers do not hang together; AttestError from the
    attestation checks. Nothing is written unless every check passed.
    """
    if store.any_root():
        raise ValueError("this KMS already has root keys; refusing to onboard over them")
    base = source_url.rstrip("/").removesuffix("/prpc")
    pin = SourcePin(base)
    async with PrpcClient(base, prefix="/prpc", verify_server=pin.check) as plain:
        tmp = await plain.call("GetTempCaCert", Empty(), pb.GetTempCaCertResponse)
    if pin.cert is None:
        raise RpcError("source kms presented no certificate")
    source_att = verify_cert_binding(pin.cert)
    source_boot = await checker.boot_info(source_att)
    decision = await auth.is_kms_allowed(source_boot)
    if not decision.is_allowed:
        raise RpcError(f"source KMS is not allowed: {decision.reason}")
    source_ca = _source_ca(tmp, pin.cert)
    client_cert, client_key = ra_tls_client_cert(
        tmp.temp_ca_cert, tmp.temp_ca_key, lambda spki: ratls_attestation(agent, spki)
    )
    async with PrpcClient(
        base,
        prefix="/prpc",
        client_cert_pem=client_cert,
        client_key_pem=client_key,
        verify_server=pin.check,
    ) as mtls:
        resp = await mtls.call(
            "GetKmsKey", pb.GetKmsKeyRequest(vm_config=agent_vm_config(agent)), pb.KmsKeyResponse
        )
    if len(resp.keys) != 1:
        raise RpcError(f"source kms returned {len(resp.keys)} key sets, expected exactly one")
    if len(resp.keys[0].k256_key) != 32:
        raise RpcError("source kms returned a k256 root key that is not 32 bytes")
    root_ca = load_key_pem(resp.keys[0].ca_key)
    temp_ca = load_key_pem(resp.temp_ca_key)
    if not _same_key(root_ca.public_key(), source_ca.public_key()):
        raise RpcError("the root key the source kms released is not the key of its ca")
    if not _same_key(temp_ca.public_key(), load_key_pem(tmp.temp_ca_key).public_key()):
        raise RpcError("the temp ca key the source kms released is not its temp ca's key")
    log.info("onboarded root keys from %s", base)
    attest = (lambda spki: ratls_attestation(agent, spki)) if attest_rpc_cert else None
    return store.store(root_ca, resp.keys[0].k256_key, temp_ca, domain, attest)
