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
from collections.abc import Iterable, Mapping, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pydstack.errors import InputError
from pydstack.types import jsonlimits

from .k256 import keccak256, recover_pubkey, sign_recoverable

ENV_KEY_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
MAX_ENV_ITEMS = 1024
MAX_KEY_LEN = 255
MAX_VALUE_LEN = 128 * 1024
MAX_ENV_TOTAL = 1024 * 1024
#: JSON escaping can make the plaintext several times the 1 MiB of keys and values
MAX_ENCRYPTED_ENV = 8 * MAX_ENV_TOTAL
ENV_PUBKEY_PREFIX = "dstack-env-encrypt-pubkey"

EnvItems = Iterable[tuple[str, str]] | Iterable[Mapping[str, str]]


class EnvError(InputError):
    """encrypted env is malformed, undecryptable or over its limits."""


def x25519_public(secret: bytes) -> bytes:
    if len(secret) != 32:
        raise EnvError("an x25519 secret must be 32 bytes")
    return (
        X25519PrivateKey.from_private_bytes(secret)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def _pairs(envs: EnvItems) -> list[tuple[str, str]]:
    out = []
    for item in envs:
        if isinstance(item, Mapping):
            key, value = item.get("key"), item.get("value")
        elif isinstance(item, tuple) and len(item) == 2:
            key, value = item
        else:
            raise EnvError("env entries must be (key, value) pairs or {key, value} objects")
        if not isinstance(key, str) or not isinstance(value, str):
            raise EnvError("env key and value must be strings")
        out.append((key, value))
    return out


def encrypt_env(envs: EnvItems, public_key: bytes) -> bytes:
    """`eph_pub || iv || ciphertext+tag` of `{"env": [{"key", "value"}, ...]}` for the app's
    X25519 env public key (what the SDKs' encrypt_env_vars produce, unhexed)."""
    if len(public_key) != 32:
        raise EnvError("the env encryption public key must be 32 bytes")
    doc = {"env": [{"key": k, "value": v} for k, v in _pairs(envs)]}
    plaintext = json.dumps(doc).encode()
    eph = X25519PrivateKey.generate()
    try:
        shared = eph.exchange(X25519PublicKey.from_public_bytes(public_key))
    except ValueError as e:  # a low-order point gives an all-zero secret
        raise EnvError(f"unusable env encryption public key: {e}") from e
    iv = os.urandom(12)
    ct = AESGCM(shared).encrypt(iv, plaintext, None)
    eph_pub = eph.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return eph_pub + iv + ct


def decrypt_env(secret: bytes, blob: bytes) -> list[tuple[str, str]]:
    """decrypt and validate; every limit is checked before the values are used.

    Contract: EnvError for a secret that is not 32 bytes, a blob over `MAX_ENCRYPTED_ENV`
    (8 MiB) or too short, a low-order ephemeral key, a failed decryption, and whatever
    `parse_env_json` refuses. Linear time and memory.
    """
    if len(secret) != 32:
        raise EnvError("the env decryption secret must be 32 bytes")
    if len(blob) > MAX_ENCRYPTED_ENV:
        raise EnvError("encrypted env too large")
    if len(blob) < 32 + 12 + 16:
        raise EnvError("encrypted env too short")
    eph_pub, iv, ct = blob[:32], blob[32:44], blob[44:]
    try:
        shared = X25519PrivateKey.from_private_bytes(secret).exchange(
            X25519PublicKey.from_public_bytes(eph_pub)
        )
    except ValueError as e:
        # cryptography refuses a low-order point (an all-zero shared secret): the only check
        # needed, and the one upstream's x25519 makes too
        raise EnvError(f"invalid env encryption key agreement: {e}") from e
    try:
        plaintext = AESGCM(shared).decrypt(iv, ct, None)
    except Exception as e:
        raise EnvError("failed to decrypt env: wrong key or corrupted data") from e
    return parse_env_json(plaintext)


def parse_env_json(plaintext: bytes) -> list[tuple[str, str]]:
    """the (key, value) list of decrypted env JSON, within upstream's limits.

    Limits apply to every entry (upstream checks sizes only on allowed ones): at most 1024
    entries, keys up to 255 bytes, values up to 128 KiB, keys and values together up to 1 MiB.
    Key names are checked by `filter_allowed_envs`. EnvError for anything refused (the JSON
    through `jsonlimits.loads`, lone surrogates included); linear time and memory.
    """
    if len(plaintext) > MAX_ENCRYPTED_ENV:
        raise EnvError("decrypted env too large")
    try:
        doc = jsonlimits.loads(plaintext)
    except (ValueError, RecursionError) as e:
        raise EnvError(f"decrypted env is not json: {e}") from e
    # {"env": [...]} is the documented form; a bare list is accepted as older encoders wrote it
    items = doc.get("env") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise EnvError('decrypted env must be {"env": [...]}')
    if len(items) > MAX_ENV_ITEMS:
        raise EnvError(f"too many env vars ({len(items)} > {MAX_ENV_ITEMS})")
    out = []
    total = 0
    for item in items:
        if not isinstance(item, dict):
            raise EnvError("env entries must be objects")
        key, value = item.get("key"), item.get("value")
        if not isinstance(key, str) or not isinstance(value, str):
            raise EnvError("env key and value must be strings")
        try:
            key_len, value_len = len(key.encode()), len(value.encode())
        except UnicodeEncodeError as e:  # lone surrogates from \ud800 escapes
            raise EnvError("env key or value is not valid unicode") from e
        if key_len > MAX_KEY_LEN:
            raise EnvError(f"env var name too long ({key_len} > {MAX_KEY_LEN} bytes)")
        if value_len > MAX_VALUE_LEN:
            raise EnvError(f"env var {key!r} value too long ({value_len} > {MAX_VALUE_LEN} bytes)")
        total += key_len + value_len
        if total > MAX_ENV_TOTAL:
            raise EnvError("env vars exceed 1 MiB in total")
        out.append((key, value))
    return out


def filter_allowed_envs(
    envs: Sequence[tuple[str, str]], allowed: Iterable[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    """(kept, dropped names), as the guest does before writing `.decrypted-env`.

    Entries whose key is not in `allowed` are dropped; an allowed key that is not a valid
    variable name (`^[a-zA-Z_][a-zA-Z0-9_]*$`) is an error, as upstream. A repeated key keeps
    its last value; kept entries come sorted by key (upstream keeps them in a BTreeMap).
    """
    allow = set(allowed)
    kept: dict[str, str] = {}
    dropped = []
    for key, value in envs:
        if key not in allow:
            dropped.append(key)
            continue
        if not ENV_KEY_RE.fullmatch(key):
            raise EnvError(f"invalid env key: {key[:64]!r}")
        kept[key] = value
    return sorted(kept.items()), dropped


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
