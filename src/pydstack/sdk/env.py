"""client-side env encryption and the KMS signature check on the env public key.

Layout (upstream's): `eph_pub(32) || iv(12) || AES-256-GCM(ciphertext || tag)` hex-encoded, the
raw X25519 shared secret as the key, plaintext `{"env": [{"key", "value"}, ...]}`. Before
encrypting, check that the KMS signed the public key: the signer recovered from the signature
must be the KMS's k256 key you trust.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import warnings
from dataclasses import dataclass

from coincurve import PublicKey
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pydstack.crypto.keccak import keccak256

PREFIX = b"dstack-env-encrypt-pubkey"


@dataclass
class EnvVar:
    key: str
    value: str


def _pub(public_key_hex: str) -> X25519PublicKey:
    raw = bytes.fromhex(public_key_hex.removeprefix("0x"))
    if len(raw) != 32:
        raise ValueError("the env encryption public key must be 32 bytes")
    return X25519PublicKey.from_public_bytes(raw)


def encrypt_env_vars_sync(envs: list[EnvVar], public_key_hex: str) -> str:
    plaintext = json.dumps({"env": [{"key": e.key, "value": e.value} for e in envs]}).encode()
    eph = X25519PrivateKey.generate()
    shared = eph.exchange(_pub(public_key_hex))
    iv = os.urandom(12)
    ct = AESGCM(shared).encrypt(iv, plaintext, None)
    eph_pub = eph.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return (eph_pub + iv + ct).hex()


async def encrypt_env_vars(envs: list[EnvVar], public_key_hex: str) -> str:
    return await asyncio.to_thread(encrypt_env_vars_sync, envs, public_key_hex)


def _app_id(app_id: str | bytes) -> bytes:
    raw = bytes.fromhex(app_id.removeprefix("0x")) if isinstance(app_id, str) else bytes(app_id)
    if len(raw) != 20:
        raise ValueError("app_id must be 20 bytes")
    return raw


def _recover(message: bytes, signature: bytes) -> str | None:
    if len(signature) != 65:
        return None
    v = signature[64] - 27 if signature[64] >= 27 else signature[64]
    if v not in (0, 1):
        return None
    digest = keccak256(message)
    try:
        pub = PublicKey.from_signature_and_message(signature[:64] + bytes([v]), digest, hasher=None)
    except Exception:
        return None
    return "0x" + pub.format(compressed=True).hex()


def verify_env_encrypt_public_key(
    public_key: bytes,
    signature: bytes,
    app_id: str | bytes,
    timestamp: int,
    max_age_seconds: int = 300,
) -> str | None:
    """the KMS signer ("0x" + compressed hex) of a timestamped env-key signature, or None."""
    now = int(time.time())
    if timestamp > now + 60 or now - timestamp > max_age_seconds:
        return None
    msg = PREFIX + b":" + _app_id(app_id) + timestamp.to_bytes(8, "big") + bytes(public_key)
    return _recover(msg, bytes(signature))


def verify_env_encrypt_public_key_legacy(
    public_key: bytes, signature: bytes, app_id: str | bytes
) -> str | None:
    """the signer of a legacy (untimestamped, replayable) env-key signature, or None."""
    warnings.warn(
        "legacy env public key signatures carry no timestamp; use the v1 signature",
        DeprecationWarning,
        stacklevel=2,
    )
    return _recover(PREFIX + b":" + _app_id(app_id) + bytes(public_key), bytes(signature))
