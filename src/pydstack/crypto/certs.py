"""X.509 certificates in upstream's profile (rcgen defaults as dstack uses them).

Subject `[O=org] CN=subject`; KeyUsage digitalSignature (critical), plus keyCertSign and cRLSign
for CAs with BasicConstraints CA pathlen=ca_level; EKU serverAuth / clientAuth on request; SANs
(IP addresses become IP SANs); serial = sha256(uncompressed public point)[:20] with the top bit
cleared; SKI = sha256(SPKI DER)[:20]; validity from 1975-01-01 to now + 3650 days by default;
ECDSA-SHA256 signatures; dstack's custom extensions (app id, usage, attestation, app info) as
OCTET STRING-wrapped values under 1.3.6.1.4.1.62397.1.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pydstack.attest.ratls import (
    OID_APP_ID,
    OID_APP_INFO,
    OID_ATTESTATION,
    OID_SPECIAL_USAGE,
    wrap_extension_value,
)

DEFAULT_NOT_BEFORE = int(dt.datetime(1975, 1, 1, tzinfo=dt.UTC).timestamp())
DEFAULT_VALIDITY = 3650 * 24 * 3600


@dataclass(frozen=True)
class CertRequest:
    subject: str
    org_name: str | None = None
    alt_names: tuple[str, ...] = ()
    usage_server_auth: bool = False
    usage_client_auth: bool = False
    #: None: not a CA; else a CA with this path length
    ca_level: int | None = None
    not_before: int | None = None
    not_after: int | None = None
    app_id: bytes | None = None
    special_usage: str | None = None
    attestation: bytes | None = None
    app_info: bytes | None = None


def generate_p256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def spki_der(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _serial(public_key: ec.EllipticCurvePublicKey) -> int:
    point = public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    raw = bytearray(hashlib.sha256(point).digest()[:20])
    raw[0] &= 0x7F
    return int.from_bytes(raw, "big") or 1


def _name(req: CertRequest) -> x509.Name:
    attrs = []
    if req.org_name is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, req.org_name))
    # rcgen (upstream) accepts any subject, including the empty one SDKs send by default
    valid = 1 <= len(req.subject) <= 64
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, req.subject, _validate=valid))
    return x509.Name(attrs)


def _ts(value: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, dt.UTC)


def issue_cert(
    req: CertRequest,
    public_key: ec.EllipticCurvePublicKey,
    signer_key: ec.EllipticCurvePrivateKey,
    issuer_cert: x509.Certificate | None = None,
) -> x509.Certificate:
    """a certificate for `public_key`, signed by `signer_key` (self-signed without issuer)."""
    not_before = req.not_before if req.not_before is not None else DEFAULT_NOT_BEFORE
    not_after = req.not_after if req.not_after is not None else int(time.time()) + DEFAULT_VALIDITY
    if not_before >= not_after:
        raise ValueError("not_before must be earlier than not_after")
    subject = _name(req)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
        .public_key(public_key)
        .serial_number(_serial(public_key))
        .not_valid_before(_ts(not_before))
        .not_valid_after(_ts(not_after))
    )
    is_ca = req.ca_level is not None
    builder = builder.add_extension(
        x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=is_ca,
            crl_sign=is_ca,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier(hashlib.sha256(spki_der(public_key)).digest()[:20]),
        critical=False,
    )
    if is_ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=req.ca_level), critical=True
        )
    usages = []
    if req.usage_server_auth:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if req.usage_client_auth:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if req.alt_names:
        sans: list[x509.GeneralName] = []
        for name in req.alt_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for oid, value in (
        (OID_APP_ID, req.app_id),
        (OID_SPECIAL_USAGE, req.special_usage.encode() if req.special_usage else None),
        (OID_ATTESTATION, req.attestation),
        (OID_APP_INFO, req.app_info),
    ):
        if value is not None:
            builder = builder.add_extension(
                x509.UnrecognizedExtension(oid, wrap_extension_value(value)), critical=False
            )
    return builder.sign(signer_key, hashes.SHA256())


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def load_key_pem(pem: str | bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem.encode() if isinstance(pem, str) else pem, None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("expected an elliptic-curve private key")
    return key


def load_cert_pem(pem: str | bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)


def ra_tls_client_cert(
    temp_ca_cert_pem: str, temp_ca_key_pem: str, attest: Callable[[bytes], bytes]
) -> tuple[str, str]:
    """an "RA-TLS TEMP Cert" for a fresh key, signed by a KMS temp CA: (cert PEM, key PEM).

    `attest(spki_der)` returns the versioned attestation bound to that key."""
    key = generate_p256_key()
    cert = issue_cert(
        CertRequest(
            "RA-TLS TEMP Cert",
            usage_client_auth=True,
            attestation=attest(spki_der(key.public_key())),
        ),
        key.public_key(),
        load_key_pem(temp_ca_key_pem),
        load_cert_pem(temp_ca_cert_pem),
    )
    return cert_pem(cert), key_pem(key)
