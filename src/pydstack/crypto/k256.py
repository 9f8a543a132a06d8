"""secp256k1: recoverable signatures over keccak-256 (the KMS signature chain), plain ECDSA
over sha256 (the guest agent's Sign/Verify) and GetKey's two-entry chain."""

from __future__ import annotations

import hashlib

from coincurve import PrivateKey, PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from . import ed25519
from .kdf import derive_key
from .keccak import keccak256 as keccak256  # re-exported: the signature chain hashes with it

SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _key(secret: bytes) -> PrivateKey:
    if len(secret) != 32:
        raise ValueError("a secp256k1 secret must be 32 bytes")
    d = int.from_bytes(secret, "big")
    if d == 0 or d >= SECP256K1_ORDER:
        raise ValueError("invalid secp256k1 secret")
    return PrivateKey(secret)


def compressed_pubkey(secret: bytes) -> bytes:
    return bytes(_key(secret).public_key.format(compressed=True))


def sign_recoverable(secret: bytes, digest32: bytes) -> bytes:
    """65 bytes r || s || v (v in {0, 1}); RFC 6979 nonces, low S."""
    if len(digest32) != 32:
        raise ValueError("digest must be 32 bytes")
    return bytes(_key(secret).sign_recoverable(digest32, hasher=None))


def recover_pubkey(digest32: bytes, signature: bytes) -> bytes:
    """the compressed public key that made `signature` (v may be 0/1 or 27/28)."""
    if len(signature) != 65 or len(digest32) != 32:
        raise ValueError("a recoverable signature is 65 bytes over a 32-byte digest")
    v = signature[64]
    if v >= 27:
        v -= 27
    if v not in (0, 1):
        raise ValueError("invalid recovery id")
    try:
        pub = PublicKey.from_signature_and_message(
            signature[:64] + bytes([v]), digest32, hasher=None
        )
    except Exception as e:
        raise ValueError(f"cannot recover the signer: {e}") from e
    return bytes(pub.format(compressed=True))


def sign_message(secret: bytes, prefix: str, app_id: bytes, message: bytes) -> bytes:
    """keccak256(prefix ":" app_id message), signed recoverably (the KMS's sign_message)."""
    return sign_recoverable(secret, keccak256(prefix.encode() + b":" + app_id + message))


def sign_message_with_timestamp(
    secret: bytes, prefix: str, app_id: bytes, timestamp: int, message: bytes
) -> bytes:
    digest = keccak256(prefix.encode() + b":" + app_id + timestamp.to_bytes(8, "big") + message)
    return sign_recoverable(secret, digest)


def sign_ecdsa(secret: bytes, data: bytes, *, prehashed: bool = False) -> bytes:
    """64-byte r || s over sha256(data) (or over data itself when prehashed), low S."""
    digest = data if prehashed else hashlib.sha256(data).digest()
    if len(digest) != 32:
        raise ValueError("pre-hashed data must be 32 bytes")
    rec = _key(secret).sign_recoverable(digest, hasher=None)
    return bytes(rec[:64])


def verify_ecdsa(
    public_key: bytes, data: bytes, signature: bytes, *, prehashed: bool = False
) -> bool:
    """True for a valid low-S signature; malformed keys or signatures raise ValueError."""
    if len(signature) != 64:
        raise ValueError("invalid signature")
    try:
        pub = PublicKey(public_key)
    except Exception as e:
        raise ValueError("invalid public key") from e
    digest = data if prehashed else hashlib.sha256(data).digest()
    if len(digest) != 32:
        raise ValueError("pre-hashed data must be 32 bytes")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    if not (0 < r < SECP256K1_ORDER and 0 < s < SECP256K1_ORDER):
        raise ValueError("invalid signature")
    if s > SECP256K1_ORDER // 2:
        return False
    return bool(pub.verify(encode_dss_signature(r, s), digest, hasher=None))


def get_key_chain(
    app_k256_key: bytes,
    path: str,
    purpose: str,
    algorithm: str,
    k256_signature: bytes,
) -> tuple[bytes, list[bytes]]:
    """GetKey: the derived key and [app signature, KMS signature].

    key = HKDF(app key, path); the app key signs keccak256(purpose ":" hex(derived public key))
    where the public key is compressed secp256k1 or raw ed25519 (`algorithm` "secp256k1" or
    "ed25519"; callers map upstream's aliases first).
    """
    key = derive_key(app_k256_key, [path.encode()], 32)
    if algorithm == "ed25519":
        pub = ed25519.public_key(key)
    elif algorithm == "secp256k1":
        pub = compressed_pubkey(key)
    else:
        raise ValueError(f"unsupported algorithm {algorithm[:32]!r}")
    app_sig = sign_recoverable(app_k256_key, keccak256(f"{purpose}:{pub.hex()}".encode()))
    return key, [app_sig, k256_signature]
