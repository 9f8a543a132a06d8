"""encrypted environment variables (X25519 + AES-256-GCM, upstream's layout).

`eph_pub(32) || iv(12) || ciphertext+tag`; the raw X25519 shared secret is the AES key (no
KDF); plaintext `{"env": [{"key": K, "value": V}, ...]}`. The KMS signs the app's env public key
(secp256k1, recoverable) over keccak256("dstack-env-encrypt-pubkey:" || app_id [|| u64be ts] ||
pub).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .k256 import keccak256, recover_pubkey, sign_recoverable

ENV_KEY_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
MAX_ENV_ITEMS = 1024
MAX_KEY_LEN = 255
MAX_VALUE_LEN = 128 * 1024
MAX_ENV_TOTAL = 1024 * 1024
MAX_ENCRYPTED_ENV = MAX_ENV_TOTAL * 2 + 1024
ENV_PUBKEY_PREFIX = "dstack-env-encrypt-pubkey"


class EnvError(ValueError):
    """encrypted env is malformed, undecryptable or over its limits."""


def x25519_public(secret: bytes) -> bytes:
    return (
        X25519PrivateKey.from_private_bytes(secret)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def encrypt_env(envs: Iterable[tuple[str, str]], public_key: bytes) -> bytes:
    plaintext = json.dumps({"env": [{"key": k, "value": v} for k, v in envs]}).encode()
    eph = X25519PrivateKey.generate()
    shared = eph.exchange(X25519PublicKey.from_public_bytes(public_key))
    iv = os.urandom(12)
    ct = AESGCM(shared).encrypt(iv, plaintext, None)
    eph_pub = eph.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return eph_pub + iv + ct


def decrypt_env(secret: bytes, blob: bytes) -> list[tuple[str, str]]:
    """decrypt and validate; every limit is checked before the values are used."""
    if len(blob) > MAX_ENCRYPTED_ENV:
        raise EnvError("encrypted env too large")
    if len(blob) < 32 + 12 + 16:
        raise EnvError("encrypted env too short")
    eph_pub, iv, ct = blob[:32], blob[32:44], blob[44:]
    try:
        shared = X25519PrivateKey.from_private_bytes(secret).exchange(
            X25519PublicKey.from_public_bytes(eph_pub)
        )
    except ValueError as e:  # cryptography refuses an all-zero shared secret
        raise EnvError(f"invalid env encryption key agreement: {e}") from e
    if not any(shared):
        raise EnvError("invalid env encryption key agreement: all-zero shared secret")
    try:
        plaintext = AESGCM(shared).decrypt(iv, ct, None)
    except Exception as e:
        raise EnvError("failed to decrypt env: wrong key or corrupted data") from e
    return parse_env_json(plaintext)


def parse_env_json(plaintext: bytes) -> list[tuple[str, str]]:
    if len(plaintext) > MAX_ENV_TOTAL:
        raise EnvError("decrypted env exceeds 1 MiB")
    try:
        doc = json.loads(plaintext)
    except ValueError as e:
        raise EnvError(f"decrypted env is not json: {e}") from e
    # {"env": [...]} is the documented form; a bare list is accepted as older encoders wrote it
    items = doc.get("env") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise EnvError('decrypted env must be {"env": [...]}')
    if len(items) > MAX_ENV_ITEMS:
        raise EnvError(f"too many env vars ({len(items)} > {MAX_ENV_ITEMS})")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise EnvError("env entries must be objects")
        key, value = item.get("key"), item.get("value")
        if not isinstance(key, str) or not isinstance(value, str):
            raise EnvError("env key and value must be strings")
        if len(key.encode()) > MAX_KEY_LEN or len(value.encode()) > MAX_VALUE_LEN:
            raise EnvError(f"env var {key[:64]!r} exceeds the size limits")
        out.append((key, value))
    return out


def filter_allowed_envs(
    envs: Sequence[tuple[str, str]], allowed: Iterable[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    """(kept, dropped names): only allowed, well-formed keys pass."""
    allow = set(allowed)
    kept, dropped = [], []
    for key, value in envs:
        if key in allow and ENV_KEY_RE.match(key):
            kept.append((key, value))
        else:
            dropped.append(key)
    return kept, dropped


def _pubkey_digest(app_id: bytes, public_key: bytes, timestamp: int | None) -> bytes:
    ts = b"" if timestamp is None else timestamp.to_bytes(8, "big")
    return keccak256(ENV_PUBKEY_PREFIX.encode() + b":" + app_id + ts + public_key)


def sign_env_pubkey(
    k256_root: bytes, app_id: bytes, public_key: bytes, timestamp: int | None = None
) -> bytes:
    return sign_recoverable(k256_root, _pubkey_digest(app_id, public_key, timestamp))


def recover_env_pubkey_signer(
    app_id: bytes, public_key: bytes, signature: bytes, timestamp: int | None = None
) -> bytes:
    return recover_pubkey(_pubkey_digest(app_id, public_key, timestamp), signature)


def verify_env_encrypt_public_key(
    public_key: bytes,
    signature: bytes,
    app_id: bytes,
    timestamp: int,
    *,
    max_age_seconds: int = 300,
    now: int | None = None,
) -> bytes | None:
    """the signer's compressed key, or None when the signature or its age is not acceptable."""
    now = int(time.time()) if now is None else now
    if timestamp > now + 60 or now - timestamp > max_age_seconds:
        return None
    try:
        return recover_env_pubkey_signer(app_id, public_key, signature, timestamp)
    except ValueError:
        return None
