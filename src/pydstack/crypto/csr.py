"""the KMS certificate signing request (upstream `CertSigningRequestV2`, SCALE-encoded).

`confirm: String ("please sign cert:") || pubkey: Vec<u8> (SPKI DER) || config: CertConfigV2 ||
attestation` (the versioned attestation bytes, consuming the rest). CertConfigV2 = `org_name:
Option<String>, subject: String, subject_alt_names: Vec<String>, usage_server_auth: bool,
usage_client_auth: bool, ext_quote: bool, ext_app_info: bool, not_before: Option<u64>,
not_after: Option<u64>`. The signature is ECDSA P-256 SHA-256 (DER) by the CSR key over the
SCALE bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.attest.errors import ParseError, VerifyError
from pydstack.attest.scale import Reader, Writer

CONFIRM = "please sign cert:"
#: upstream caps the attestation at 10 MiB; the rest of a request is small
MAX_CSR_SIZE = 10 * 1024 * 1024 + 64 * 1024


@dataclass(frozen=True)
class CertConfigV2:
    org_name: str | None
    subject: str
    subject_alt_names: tuple[str, ...]
    usage_server_auth: bool
    usage_client_auth: bool
    ext_quote: bool
    ext_app_info: bool = False
    not_before: int | None = None
    not_after: int | None = None


@dataclass(frozen=True)
class CertSigningRequestV2:
    confirm: str
    pubkey: bytes
    config: CertConfigV2
    attestation: bytes

    def encode(self) -> bytes:
        """the SCALE bytes (what is signed and sent as `SignCertRequest.csr`)."""
        c = self.config
        for t in (c.not_before, c.not_after):
            if t is not None and not 0 <= t < 1 << 64:
                raise ValueError("csr validity times are u64 unix seconds")
        w = Writer()
        w.write_str(self.confirm)
        w.write_bytes(self.pubkey)
        w.write_option(c.org_name, w.write_str)
        w.write_str(c.subject)
        w.write_compact(len(c.subject_alt_names))
        for name in c.subject_alt_names:
            w.write_str(name)
        for flag in (c.usage_server_auth, c.usage_client_auth, c.ext_quote, c.ext_app_info):
            w.write_bool(flag)
        w.write_option(c.not_before, w.write_u64)
        w.write_option(c.not_after, w.write_u64)
        w.write_raw(self.attestation)
        return w.getvalue()

    @classmethod
    def decode(cls, data: bytes) -> CertSigningRequestV2:
        """the request in `data`; ParseError if it is not one: over `MAX_CSR_SIZE`, or SCALE
        that is truncated, non-canonical (compact integers, bools, option tags), not UTF-8, or
        declares a length or count beyond the bytes left (checked before reading). Canonical:
        a request that decodes encodes to the same bytes. Linear time and memory."""
        if len(data) > MAX_CSR_SIZE:
            raise ParseError("csr too large")
        r = Reader(data)
        confirm = r.read_str()
        pubkey = r.read_bytes()
        config = CertConfigV2(
            org_name=r.read_option(r.read_str),
            subject=r.read_str(),
            subject_alt_names=tuple(r.read_vec(r.read_str)),
            usage_server_auth=r.read_bool(),
            usage_client_auth=r.read_bool(),
            ext_quote=r.read_bool(),
            ext_app_info=r.read_bool(),
            not_before=r.read_option(r.read_u64),
            not_after=r.read_option(r.read_u64),
        )
        return cls(confirm, pubkey, config, r.take(r.remaining))

    def sign(self, key: ec.EllipticCurvePrivateKey) -> bytes:
        """ECDSA P-256 SHA-256 (DER) over the SCALE bytes, as the CSR key signs them."""
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("csr keys are p-256")
        return key.sign(self.encode(), ec.ECDSA(hashes.SHA256()))

    def verify(self, signature: bytes) -> None:
        """raise unless `signature` by `pubkey` covers this request and its confirm word is
        upstream's (ParseError for an unusable key, VerifyError for a bad signature)."""
        try:
            pub = serialization.load_der_public_key(self.pubkey)
        except (ValueError, UnsupportedAlgorithm) as e:
            raise ParseError(f"csr public key is invalid: {e}") from e
        if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(
            pub.curve, ec.SECP256R1
        ):
            raise ParseError("csr public key must be a p-256 key")
        try:
            pub.verify(signature, self.encode(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as e:
            raise VerifyError("csr signature is invalid") from e
        if self.confirm != CONFIRM:
            raise VerifyError("csr confirm word is wrong")
