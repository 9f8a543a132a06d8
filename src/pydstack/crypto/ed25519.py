"""ed25519 keys from 32-byte seeds (RFC 8032)."""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


def public_key(seed: bytes) -> bytes:
    key = Ed25519PrivateKey.from_private_bytes(seed)
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(seed: bytes, data: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).sign(data)


def verify(public: bytes, data: bytes, signature: bytes) -> bool:
    """True for a valid signature; a malformed key or signature raises ValueError."""
    if len(public) != 32:
        raise ValueError("invalid public key")
    if len(signature) != 64:
        raise ValueError("invalid signature")
    try:
        pub = Ed25519PublicKey.from_public_bytes(public)
    except ValueError as e:
        raise ValueError("invalid public key") from e
    try:
        pub.verify(signature, data)
    except InvalidSignature:
        return False
    return True
