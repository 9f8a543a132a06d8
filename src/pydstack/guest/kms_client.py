"""the guest side of the KMS: obtain an app's keys over RA-TLS.

1. `GetTempCaCert` over TLS (the KMS's certificate must carry the `kms:rpc` usage);
2. a fresh P-256 key and an "RA-TLS TEMP Cert" signed by that temp CA, carrying this CVM's
   attestation bound to the key (report_data = sha512("ratls-cert:" || SPKI));
3. `GetAppKey` over mutual TLS with that certificate.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf.empty_pb2 import Empty

from pydstack.attest.ratls import parse_ratls_cert
from pydstack.crypto.certs import load_cert_pem, ra_tls_client_cert
from pydstack.rpc.client import PrpcClient
from pydstack.rpc.errors import RpcError
from pydstack.rpc.proto import kms_rpc_pb2 as pb

from .appkeys import AppKeys, KeyProvider

#: makes the versioned attestation for a key's report_data (sha512("ratls-cert:" || spki))
AttestFn = Callable[[bytes], bytes]


def check_kms_rpc_cert(cert: x509.Certificate) -> None:
    info = parse_ratls_cert(cert)
    if info.special_usage != "kms:rpc":
        raise RpcError(f"kms certificate has usage {info.special_usage!r}, not 'kms:rpc'")


def _prpc_url(kms_url: str) -> str:
    return kms_url.rstrip("/").removesuffix("/prpc")


def ra_tls_client(base: str, temp_ca_cert: str, temp_ca_key: str, attest: AttestFn) -> PrpcClient:
    """a prpc client to the KMS over mutual TLS with a fresh attested "RA-TLS TEMP Cert"."""
    client_cert, client_key = ra_tls_client_cert(temp_ca_cert, temp_ca_key, attest)
    return PrpcClient(
        base,
        prefix="/prpc",
        client_cert_pem=client_cert,
        client_key_pem=client_key,
        verify_server=check_kms_rpc_cert,
    )


#: each KMS's temp CA (public: GetTempCaCert hands its key to anyone), so a guest that asks
#: again skips a round trip and a TLS handshake; refreshed when the KMS refuses it
_TEMP_CA: dict[str, pb.GetTempCaCertResponse] = {}


async def temp_ca(base: str, *, refresh: bool = False) -> pb.GetTempCaCertResponse:
    """the KMS's temp CA (over TLS to a certificate with the `kms:rpc` usage), cached."""
    hit = None if refresh else _TEMP_CA.get(base)
    if hit is not None:
        return hit
    async with PrpcClient(base, prefix="/prpc", verify_server=check_kms_rpc_cert) as plain:
        tmp = await plain.call("GetTempCaCert", Empty(), pb.GetTempCaCertResponse)
    _TEMP_CA[base] = tmp
    return tmp


async def get_app_keys(kms_url: str, attest: AttestFn, vm_config: str) -> tuple[AppKeys, bytes]:
    """the app keys, and the KMS root CA's SPKI DER (the `key-provider` id)."""
    base = _prpc_url(kms_url)
    request = pb.GetAppKeyRequest(api_version=1, vm_config=vm_config)
    tmp = await temp_ca(base)
    try:
        async with ra_tls_client(base, tmp.temp_ca_cert, tmp.temp_ca_key, attest) as mtls:
            resp = await mtls.call("GetAppKey", request, pb.AppKeyResponse)
    except (RpcError, OSError):
        if base not in _TEMP_CA:
            raise
        # the kms may have a new temp ca (a restart): ask for it once more, then give up
        tmp = await temp_ca(base, refresh=True)
        async with ra_tls_client(base, tmp.temp_ca_cert, tmp.temp_ca_key, attest) as mtls:
            resp = await mtls.call("GetAppKey", request, pb.AppKeyResponse)
    ca = load_cert_pem(resp.ca_cert)
    ca_spki = ca.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    keys = AppKeys(
        disk_crypt_key=resp.disk_crypt_key,
        env_crypt_key=resp.env_crypt_key,
        k256_key=resp.k256_key,
        k256_signature=resp.k256_signature,
        gateway_app_id=resp.gateway_app_id,
        ca_cert=resp.ca_cert,
        key_provider=KeyProvider(
            "Kms",
            {
                "url": kms_url,
                "pubkey": ca_spki.hex(),
                "tmp_ca_key": tmp.temp_ca_key,
                "tmp_ca_cert": tmp.temp_ca_cert,
            },
        ),
    )
    return keys, ca_spki
