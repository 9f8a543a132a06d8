"""WireGuard keys: Curve25519, base64 of 32 bytes, as ``wg genkey`` and ``wg pubkey`` print them.

:func:`public_key_of` raises :class:`WgKeyError` (an :class:`~pydstack.errors.InputError`) for a
private key that is not base64 of 32 bytes; no key material is ever part of a message.
"""

from __future__ import annotations

import base64
import binascii

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from pydstack.errors import InputError


class WgKeyError(InputError):
    """a WireGuard key is not base64 of 32 bytes."""


def generate_private_key() -> str:
    """a fresh private key (clamped, as ``wg genkey`` makes it)."""
    raw = bytearray(
        X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    )
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return base64.b64encode(bytes(raw)).decode()


def decode_key(key: str, what: str = "key") -> bytes:
    """the 32 bytes of a base64 key; WgKeyError naming `what` otherwise."""
    try:
        raw = base64.b64decode(key.strip(), validate=True)
    except (binascii.Error, ValueError, AttributeError):
        raise WgKeyError(f"invalid wireguard {what}: expected base64 of 32 bytes") from None
    if len(raw) != 32:
        raise WgKeyError(f"invalid wireguard {what}: expected base64 of 32 bytes")
    return raw


def check_public_key(key: str) -> str:
    """`key` when it is base64 of 32 bytes in its 44 characters (no whitespace around it);
    WgKeyError otherwise."""
    if not isinstance(key, str) or len(key) != 44:
        raise WgKeyError("invalid wireguard public key: expected base64 of 32 bytes")
    decode_key(key, "public key")
    return key


def public_key_of(private_key: str) -> str:
    """the public key of a private one."""
    raw = decode_key(private_key, "private key")
    pub = X25519PrivateKey.from_private_bytes(raw).public_key()
    return base64.b64encode(pub.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
