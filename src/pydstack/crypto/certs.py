"""X.509 certificates in upstream's profile (dstack's CertRequest on rcgen 0.13).

The to-be-signed bytes match rcgen's byte for byte (checked against the simulator's KMS CA):

* subject `[O=org] CN=subject` (UTF8String); issuer = the issuer certificate's subject;
* serial = sha256(uncompressed public point)[:20] with the top bit cleared;
* validity from 1975-01-01 (default) to now + 3650 days (default), UTCTime before 2050;
* extensions in rcgen's order: SANs (an entry that parses as an IP address becomes an IP SAN,
  the rest DNS SANs); KeyUsage (critical) digitalSignature, plus keyCertSign and cRLSign for a
  CA, written as rcgen writes it (a 9-bit BIT STRING, `03 03 07 xx 00`); EKU serverAuth /
  clientAuth on request; for a CA only, SKI = sha256(SPKI DER)[:20] and BasicConstraints
  (critical) CA with pathlen = ca_level; then dstack's custom extensions, non-critical, each an
  OCTET STRING-wrapped value under 1.3.6.1.4.1.62397.1, in upstream's order: app id (.3), app
  info (.9), special usage (.4), attestation (.8);
* ECDSA-SHA256 signature by the issuer key.

The attestation goes in as given: callers embed the stripped form (`attestation.stripped`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from pydstack.attest.ratls import (
    OID_APP_ID,
    OID_APP_INFO,
    OID_ATTESTATION,
    OID_SPECIAL_USAGE,
    wrap_extension_value,
)
from pydstack.crypto.certload import load_cert_pem as load_cert_pem

DEFAULT_NOT_BEFORE = int(dt.datetime(1975, 1, 1, tzinfo=dt.UTC).timestamp())
DEFAULT_VALIDITY = 3650 * 24 * 3600
# KeyUsage as rcgen writes it: all nine RFC 5280 bits in two bytes, 7 unused bits
_KU_LEAF = bytes.fromhex("0303078000")  # digitalSignature
_KU_CA = bytes.fromhex("0303078600")  # digitalSignature, keyCertSign, cRLSign
MAX_PATH_LEN = 255
MAX_TIME = 253402300799  # 9999-12-31T23:59:59Z, the last instant X.509 can express


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


def _attribute(oid: x509.ObjectIdentifier, value: str) -> x509.NameAttribute[str]:
    # rcgen (upstream) writes any length, including the empty subject SDKs send by default;
    # X.509's upper bounds (64 bytes for O and CN) are advisory, so do the same, quietly
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return x509.NameAttribute(oid, value, _validate=False)


def _name(req: CertRequest) -> x509.Name:
    attrs = []
    if req.org_name is not None:
        attrs.append(_attribute(NameOID.ORGANIZATION_NAME, req.org_name))
    attrs.append(_attribute(NameOID.COMMON_NAME, req.subject))
    return x509.Name(attrs)


def _general_name(name: str) -> x509.GeneralName:
    if "%" not in name:  # a scoped IPv6 address is no IP SAN (nor one for rcgen)
        try:
            return x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            pass
    if not name.isascii():
        raise ValueError(f"alt name {name[:64]!r} is not ascii (use its idna a-label)")
    return x509.DNSName(name)


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
    if not (0 <= not_before <= MAX_TIME and 0 <= not_after <= MAX_TIME):
        raise ValueError("certificate validity must lie between 1970 and 9999")
    if not_before >= not_after:
        raise ValueError("not_before must be earlier than not_after")
    if req.ca_level is not None and not 0 <= req.ca_level <= MAX_PATH_LEN:
        raise ValueError(f"ca_level must be within 0..{MAX_PATH_LEN}")
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
    # extensions in rcgen 0.13's order: SAN, KeyUsage, EKU, (CA: SKI, BasicConstraints), custom
    if req.alt_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in req.alt_names]), critical=False
        )
    is_ca = req.ca_level is not None
    builder = builder.add_extension(
        x509.UnrecognizedExtension(ExtensionOID.KEY_USAGE, _KU_CA if is_ca else _KU_LEAF),
        critical=True,
    )
    usages = []
    if req.usage_server_auth:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if req.usage_client_auth:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if is_ca:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier(hashlib.sha256(spki_der(public_key)).digest()[:20]),
            critical=False,
        )
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=req.ca_level), critical=True
        )
    for oid, value in (
        (OID_APP_ID, req.app_id),
        (OID_APP_INFO, req.app_info),
        (OID_SPECIAL_USAGE, None if req.special_usage is None else req.special_usage.encode()),
        (OID_ATTESTATION, req.attestation),
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
