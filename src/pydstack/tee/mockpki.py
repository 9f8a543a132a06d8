"""a mock Intel SGX/TDX PKI derived from a 32-byte seed.

Every key is a P-256 scalar `sha256("pydstack-mock-p256-v1" || seed || label || u32be(counter))`
for the first counter giving a valid scalar, and certificates are signed with deterministic
ECDSA, so one seed always gives the same root certificate bytes. The hierarchy mirrors Intel's:
root CA -> PCK Platform CA -> PCK certificate (with the SGX extension dcap-qvl reads: PPID, TCB
components, PCE SVN, CPU SVN, PCE-ID, FMSPC, SGX type), root CA -> TCB signing certificate, and
the two CRLs (root CA CRL, PCK CRL) the chain checks require. Names carry a "Mock" prefix: this
PKI is for development and tests, never mistaken for Intel's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
NOT_BEFORE = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
NOT_AFTER = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"

DEFAULT_FMSPC = bytes.fromhex("00906ED50000")
DEFAULT_PCE_ID = bytes.fromhex("0000")
DEFAULT_CPU_SVN = bytes([2, 2, 2, 2, 3, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0])
DEFAULT_PCE_SVN = 11


def derive_p256(seed: bytes, label: str) -> ec.EllipticCurvePrivateKey:
    counter = 0
    while True:
        digest = hashlib.sha256(
            b"pydstack-mock-p256-v1" + seed + label.encode() + counter.to_bytes(4, "big")
        ).digest()
        d = int.from_bytes(digest, "big")
        if 0 < d < P256_ORDER:
            return ec.derive_private_key(d, ec.SECP256R1())
        counter += 1


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


def _oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytearray([40 * parts[0] + parts[1]])
    for p in parts[2:]:
        chunk = [p & 0x7F]
        p >>= 7
        while p:
            chunk.append(0x80 | (p & 0x7F))
            p >>= 7
        body += bytes(reversed(chunk))
    return _tlv(0x06, bytes(body))


def _int(v: int) -> bytes:
    raw = v.to_bytes((v.bit_length() + 8) // 8 or 1, "big")
    return _tlv(0x02, raw)


def _pair(oid: str, value: bytes) -> bytes:
    return _tlv(0x30, _oid(oid) + value)


def sgx_extension_value(
    *, ppid: bytes, cpu_svn: bytes, pce_svn: int, pce_id: bytes, fmspc: bytes, sgx_type: int = 0
) -> bytes:
    """the DER value of the Intel SGX extension (1.2.840.113741.1.13.1) of a PCK certificate."""
    base = SGX_EXTENSION_OID
    tcb = b"".join(_pair(f"{base}.2.{i + 1}", _int(svn)) for i, svn in enumerate(cpu_svn))
    tcb += _pair(f"{base}.2.17", _int(pce_svn)) + _pair(f"{base}.2.18", _tlv(0x04, cpu_svn))
    body = (
        _pair(f"{base}.1", _tlv(0x04, ppid))
        + _pair(f"{base}.2", _tlv(0x30, tcb))
        + _pair(f"{base}.3", _tlv(0x04, pce_id))
        + _pair(f"{base}.4", _tlv(0x04, fmspc))
        + _pair(f"{base}.5", _tlv(0x0A, bytes([sgx_type])))
    )
    return _tlv(0x30, body)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pydstack Mock Intel Corporation"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
            x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )


def _ski(key: ec.EllipticCurvePublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key)


def _ku(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=not ca,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class PlatformTcb:
    """what the PCK certificate says about the platform."""

    ppid: bytes = bytes(16)
    cpu_svn: bytes = DEFAULT_CPU_SVN
    pce_svn: int = DEFAULT_PCE_SVN
    pce_id: bytes = DEFAULT_PCE_ID
    fmspc: bytes = DEFAULT_FMSPC


class MockPki:
    """the whole mock hierarchy for one seed."""

    def __init__(self, seed: bytes, platform: PlatformTcb | None = None) -> None:
        if len(seed) != 32:
            raise ValueError("the mock attestation seed must be 32 bytes")
        self.seed = seed
        self.platform = platform or PlatformTcb(ppid=hashlib.sha256(b"ppid" + seed).digest()[:16])
        self.root_key = derive_p256(seed, "tdx-root")
        self.pck_ca_key = derive_p256(seed, "tdx-pck-ca")
        self.pck_key = derive_p256(seed, "tdx-pck")
        self.tcb_key = derive_p256(seed, "tdx-tcb")

    def _cert(
        self,
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Certificate | None,
        issuer_key: ec.EllipticCurvePrivateKey,
        *,
        ca: bool,
        path_length: int | None,
        serial: int,
        extra: list[x509.ExtensionType] | None = None,
    ) -> x509.Certificate:
        name = _name(subject)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer.subject if issuer is not None else name)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(NOT_BEFORE)
            .not_valid_after(NOT_AFTER)
            .add_extension(_ski(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
            .add_extension(_ku(ca=ca), critical=True)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        )
        for ext in extra or []:
            builder = builder.add_extension(ext, critical=False)
        return builder.sign(issuer_key, hashes.SHA256(), ecdsa_deterministic=True)

    @cached_property
    def root_cert(self) -> x509.Certificate:
        return self._cert(
            "Mock Intel SGX Root CA",
            self.root_key,
            None,
            self.root_key,
            ca=True,
            path_length=1,
            serial=0x4201,
        )

    @cached_property
    def pck_ca_cert(self) -> x509.Certificate:
        return self._cert(
            "Mock Intel SGX PCK Platform CA",
            self.pck_ca_key,
            self.root_cert,
            self.root_key,
            ca=True,
            path_length=0,
            serial=0x4202,
        )

    @cached_property
    def pck_cert(self) -> x509.Certificate:
        p = self.platform
        ext = x509.UnrecognizedExtension(
            x509.ObjectIdentifier(SGX_EXTENSION_OID),
            sgx_extension_value(
                ppid=p.ppid, cpu_svn=p.cpu_svn, pce_svn=p.pce_svn, pce_id=p.pce_id, fmspc=p.fmspc
            ),
        )
        return self._cert(
            "Mock Intel SGX PCK Certificate",
            self.pck_key,
            self.pck_ca_cert,
            self.pck_ca_key,
            ca=False,
            path_length=None,
            serial=0x4203,
            extra=[ext],
        )

    @cached_property
    def tcb_cert(self) -> x509.Certificate:
        return self._cert(
            "Mock Intel SGX TCB Signing",
            self.tcb_key,
            self.root_cert,
            self.root_key,
            ca=False,
            path_length=None,
            serial=0x4204,
        )

    def _crl(
        self, issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, revoked: list[int]
    ) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.subject)
            .last_update(NOT_BEFORE)
            .next_update(NOT_AFTER)
            .add_extension(x509.CRLNumber(1), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                critical=False,
            )
        )
        for serial in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(NOT_BEFORE)
                .build()
            )
        crl = builder.sign(key, hashes.SHA256(), ecdsa_deterministic=True)
        return crl.public_bytes(serialization.Encoding.DER)

    def root_ca_crl(self, revoked: list[int] | None = None) -> bytes:
        return self._crl(self.root_cert, self.root_key, revoked or [])

    def pck_crl(self, revoked: list[int] | None = None) -> bytes:
        return self._crl(self.pck_ca_cert, self.pck_ca_key, revoked or [])

    @property
    def root_ca_der(self) -> bytes:
        return self.root_cert.public_bytes(serialization.Encoding.DER)

    @staticmethod
    def pem(*certs: x509.Certificate) -> str:
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)

    @property
    def pck_chain_pem(self) -> str:
        return self.pem(self.pck_cert, self.pck_ca_cert, self.root_cert)

    @property
    def pck_crl_issuer_chain(self) -> str:
        return self.pem(self.pck_ca_cert, self.root_cert)

    @property
    def tcb_issuer_chain(self) -> str:
        return self.pem(self.tcb_cert, self.root_cert)
