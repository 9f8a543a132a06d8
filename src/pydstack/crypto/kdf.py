"""key derivation as upstream's ra-tls kdf: HKDF-SHA256 with salt "RATLS".

* derive_key(ikm, context, n): HKDF-SHA256(salt=b"RATLS", ikm, info=concat(context), L=n)
* derive_p256_key(parent, context): the HKDF output (32 bytes) used as a P-256 scalar
* derive_dh_secret(parent, context): sha256 of the derived key's PKCS#8 DER (138 bytes: a
  135-byte SEQUENCE whose ECPrivateKey has the public key and no [0] parameters field), the
  p256 crate's form — a compatibility contract (deployed disk and env keys depend on it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SALT = b"RATLS"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# PKCS#8 v0, algorithm id-ecPublicKey + prime256v1, then the ECPrivateKey (v1, d, [1] public key)
_PKCS8_PREFIX = bytes.fromhex(
    "308187020100301306072a8648ce3d020106082a8648ce3d030107046d306b0201010420"
)
_PKCS8_PUBKEY_TAG = bytes.fromhex("a144034200")


def derive_key(ikm: bytes, context: Sequence[bytes], length: int = 32) -> bytes:
    """HKDF-SHA256(salt "RATLS", ikm, info = the context parts concatenated), `length` bytes."""
    if not 1 <= length <= 255 * 32:
        raise ValueError("hkdf-sha256 output length must be within 1..8160")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=SALT, info=b"".join(context))
    return hkdf.derive(ikm)


def p256_key_from_bytes(secret: bytes) -> ec.EllipticCurvePrivateKey:
    if len(secret) != 32:
        raise ValueError("a p-256 secret must be 32 bytes")
    d = int.from_bytes(secret, "big")
    if d == 0 or d >= P256_ORDER:
        raise ValueError("derived bytes are not a valid p-256 scalar")
    return ec.derive_private_key(d, ec.SECP256R1())


def p256_scalar(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_numbers().private_value.to_bytes(32, "big")


def derive_p256_key(
    parent: ec.EllipticCurvePrivateKey | bytes, context: Sequence[bytes]
) -> ec.EllipticCurvePrivateKey:
    ikm = parent if isinstance(parent, bytes) else p256_scalar(parent)
    return p256_key_from_bytes(derive_key(ikm, context, 32))


def p256_pkcs8_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    """the 138-byte PKCS#8 DER upstream hashes (ECPrivateKey without its parameters field).

    Built here byte by byte so the bytes never depend on how the linked OpenSSL chooses to
    write PKCS#8 (whether the inner ECPrivateKey repeats the curve parameters)."""
    point = key.public_key().public_numbers()
    pub = b"\x04" + point.x.to_bytes(32, "big") + point.y.to_bytes(32, "big")
    return _PKCS8_PREFIX + p256_scalar(key) + _PKCS8_PUBKEY_TAG + pub


def derive_dh_secret(parent: ec.EllipticCurvePrivateKey | bytes, context: Sequence[bytes]) -> bytes:
    return hashlib.sha256(p256_pkcs8_der(derive_p256_key(parent, context))).digest()
