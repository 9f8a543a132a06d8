"""encrypted env: upstream's decrypt vector, SDK-compatible layout, limits, pubkey signatures."""

from __future__ import annotations

import json
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pydstack.crypto import k256
from pydstack.crypto.envcrypt import (
    EnvError,
    decrypt_env,
    encrypt_env,
    filter_allowed_envs,
    parse_env_json,
    recover_env_pubkey_signer,
    sign_env_pubkey,
    verify_env_encrypt_public_key,
    x25519_public,
)

APP_ID = bytes.fromhex("5bb4ff9a3837357f19dc176407a5709c62eb6c56")
# sdk/python/tests/test_verify_env_encrypt_public_key.py (Dstack-TEE/dstack 312dc605)
LEGACY_PUB = bytes.fromhex("e33a1832c6562067ff8f844a61e51ad051f1180b66ec2551fb0251735f3ee90a")
LEGACY_SIG = bytes.fromhex(
    "8542c49081fbf4e03f62034f13fbf70630bdf256a53032e38465a27c36fd6bed"
    "7a5e7111652004aef37f7fd92fbfc1285212c4ae6a6154203a48f5e16cad2cef00"
)
LEGACY_SIGNER = "0217610d74cbd39b6143842c6d8bc310d79da1d82cc9d17f8876376221eda0c38f"
SECRET = bytes(range(32))


def _seal(public_key: bytes, plaintext: bytes) -> bytes:
    """an independent encryptor of the documented layout."""
    eph = X25519PrivateKey.generate()
    shared = eph.exchange(X25519PublicKey.from_public_bytes(public_key))
    iv = os.urandom(12)
    return eph.public_key().public_bytes_raw() + iv + AESGCM(shared).encrypt(iv, plaintext, None)


def test_upstream_env_decrypt_vector() -> None:
    # dstack/dstack-util/src/crypto.rs test_dh_decrypt
    secret = bytes.fromhex("7c282bf94b35dc47801dc953bfa0896fc2bd313381d3e8eca4e42f6536d2a96f")
    blob = bytes.fromhex(
        "0bd18749612f4c8b9dd583c7d6a646b90abd34e3c731a7708d0caf9039095641e1f0948e775f0b73"
        "51788db7f246d51806954626dcccb6a60d64665ca3715c6bef75616cab476d27bba04080361200d6a58cec"
    )
    assert x25519_public(secret).hex() == (
        "b5ee2e67280ef8c9540850e90e6b7ee1b5e7ef011301bde95a2e6f953d04d201"
    )
    assert decrypt_env(secret, blob) == [("", "")]
    # the vector's (empty) key is not a variable name: the guest would refuse it if allowed
    assert filter_allowed_envs(decrypt_env(secret, blob), ["API_KEY"]) == ([], [""])
    with pytest.raises(EnvError, match="invalid env key"):
        filter_allowed_envs(decrypt_env(secret, blob), [""])


def test_sdk_layout_roundtrip() -> None:
    pub = x25519_public(SECRET)
    blob = encrypt_env([("API_KEY", "s3cr3t"), ("OTHER", "ü ✓")], pub)
    # eph_pub(32) || iv(12) || ciphertext+tag: decrypt it independently
    shared = X25519PrivateKey.from_private_bytes(SECRET).exchange(
        X25519PublicKey.from_public_bytes(blob[:32])
    )
    plaintext = json.loads(AESGCM(shared).decrypt(blob[32:44], blob[44:], None))
    assert plaintext == {
        "env": [{"key": "API_KEY", "value": "s3cr3t"}, {"key": "OTHER", "value": "ü ✓"}]
    }
    assert decrypt_env(SECRET, blob) == [("API_KEY", "s3cr3t"), ("OTHER", "ü ✓")]
    dicts = encrypt_env([{"key": "A", "value": "1"}, {"key": "B", "value": "2"}], pub)
    assert decrypt_env(SECRET, dicts) == [("A", "1"), ("B", "2")]
    assert decrypt_env(SECRET, _seal(pub, b'[{"key":"K","value":"v"}]')) == [("K", "v")]
    assert encrypt_env([], pub) != encrypt_env([], pub)  # fresh ephemeral key and iv
    with pytest.raises(EnvError, match="pairs"):
        encrypt_env([("A", "1", "x")], pub)  # type: ignore[arg-type]
    with pytest.raises(EnvError, match="strings"):
        encrypt_env([{"key": "A", "value": 1}], pub)  # type: ignore[arg-type]
    with pytest.raises(EnvError, match="32 bytes"):
        encrypt_env([], pub[:31])
    with pytest.raises(EnvError, match="unusable"):
        encrypt_env([], bytes(32))  # a low-order point


def test_decrypt_refusals() -> None:
    pub = x25519_public(SECRET)
    blob = encrypt_env([("API_KEY", "s3cr3t")], pub)
    with pytest.raises(EnvError, match="failed to decrypt"):
        decrypt_env(bytes(31) + b"\x01", blob)
    for cut in (0, 31, 44, 59):
        with pytest.raises(EnvError, match="too short"):
            decrypt_env(SECRET, blob[:cut])
    for pos in (0, 40, len(blob) - 1):
        tampered = bytearray(blob)
        tampered[pos] ^= 1
        with pytest.raises(EnvError):
            decrypt_env(SECRET, bytes(tampered))
    # an ephemeral key of low order makes the shared secret all zero: refused, as upstream
    with pytest.raises(EnvError, match=r"^invalid env encryption key agreement"):
        decrypt_env(SECRET, bytes(32) + blob[32:])
    with pytest.raises(EnvError, match="too large"):
        decrypt_env(SECRET, bytes(8 * 1024 * 1024 + 1))
    with pytest.raises(EnvError, match="32 bytes"):
        decrypt_env(SECRET[:16], blob)
    with pytest.raises(EnvError, match="not json"):
        decrypt_env(SECRET, _seal(pub, b"not json"))
    with pytest.raises(EnvError, match=r'\{"env"'):
        decrypt_env(SECRET, _seal(pub, b'{"vars": []}'))
    with pytest.raises(EnvError, match="objects"):
        decrypt_env(SECRET, _seal(pub, b'{"env": ["A=1"]}'))
    with pytest.raises(EnvError, match="strings"):
        decrypt_env(SECRET, _seal(pub, b'{"env": [{"key": "A"}]}'))


def test_env_limits() -> None:
    def doc(items: list[tuple[str, str]]) -> bytes:
        return json.dumps({"env": [{"key": k, "value": v} for k, v in items]}).encode()

    assert len(parse_env_json(doc([(f"K{i}", "") for i in range(1024)]))) == 1024
    with pytest.raises(EnvError, match="too many env vars"):
        parse_env_json(doc([(f"K{i}", "") for i in range(1025)]))
    assert parse_env_json(doc([("K" * 255, "")])) == [("K" * 255, "")]
    with pytest.raises(EnvError, match="name too long"):
        parse_env_json(doc([("K" * 256, "")]))
    assert parse_env_json(doc([("K", "x" * 128 * 1024)]))[0][1] == "x" * 128 * 1024
    with pytest.raises(EnvError, match="value too long"):
        parse_env_json(doc([("K", "é" * (64 * 1024 + 1))]))  # counted in utf-8 bytes
    eight = [(f"K{i}", "x" * (128 * 1024 - 2)) for i in range(8)]
    assert len(parse_env_json(doc(eight))) == 8  # 8 * 128 KiB exactly
    with pytest.raises(EnvError, match="1 MiB in total"):
        parse_env_json(doc([*eight, ("K8", "x")]))
    with pytest.raises(EnvError, match="not valid unicode"):
        parse_env_json(b'{"env": [{"key": "K", "value": "\\ud800"}]}')
    with pytest.raises(EnvError, match="not json"):
        parse_env_json(b"[" * 100_000)
    big = encrypt_env([("K", "x" * (128 * 1024 + 1))], x25519_public(SECRET))
    with pytest.raises(EnvError, match="value too long"):
        decrypt_env(SECRET, big)


def test_filter_allowed_envs() -> None:
    kept, dropped = filter_allowed_envs(
        [("ZED", "1"), ("NOPE", "2"), ("API_KEY", "a"), ("API_KEY", "b"), ("bad-key", "3")],
        ["API_KEY", "ZED"],
    )
    assert kept == [("API_KEY", "b"), ("ZED", "1")]  # sorted, last value wins
    assert dropped == ["NOPE", "bad-key"]
    for bad in ("bad-key", "1ABC", "KEY\n", "KÉY", ""):
        with pytest.raises(EnvError, match="invalid env key"):
            filter_allowed_envs([(bad, "v")], [bad])
    assert filter_allowed_envs([("_x9", "v")], ["_x9"]) == ([("_x9", "v")], [])


def test_env_pubkey_signature_vectors() -> None:
    assert recover_env_pubkey_signer(bytes(20), LEGACY_PUB, LEGACY_SIG).hex() == LEGACY_SIGNER
    assert recover_env_pubkey_signer(b"\x01" * 20, LEGACY_PUB, LEGACY_SIG).hex() != LEGACY_SIGNER
    root = bytes(31) + b"\x09"
    legacy = sign_env_pubkey(root, APP_ID, LEGACY_PUB)
    assert recover_env_pubkey_signer(APP_ID, LEGACY_PUB, legacy) == k256.compressed_pubkey(root)
    # v1: keccak256("dstack-env-encrypt-pubkey:" || app_id || u64be(ts) || pub)
    ts = 1_700_000_000
    sig_v1 = sign_env_pubkey(root, APP_ID, LEGACY_PUB, timestamp=ts)
    digest = k256.keccak256(
        b"dstack-env-encrypt-pubkey:" + APP_ID + ts.to_bytes(8, "big") + LEGACY_PUB
    )
    assert k256.recover_pubkey(digest, sig_v1) == k256.compressed_pubkey(root)
    signer = verify_env_encrypt_public_key(LEGACY_PUB, sig_v1, APP_ID, ts, now=ts + 100)
    assert signer == k256.compressed_pubkey(root)
    assert verify_env_encrypt_public_key(LEGACY_PUB, sig_v1, APP_ID, ts, now=ts + 300) == signer
    assert verify_env_encrypt_public_key(LEGACY_PUB, sig_v1, APP_ID, ts, now=ts + 301) is None
    assert (
        verify_env_encrypt_public_key(
            LEGACY_PUB, sig_v1, APP_ID, ts, max_age_seconds=1000, now=ts + 900
        )
        == signer
    )
    assert verify_env_encrypt_public_key(LEGACY_PUB, sig_v1, APP_ID, ts, now=ts - 60) == signer
    assert verify_env_encrypt_public_key(LEGACY_PUB, sig_v1, APP_ID, ts, now=ts - 61) is None
    # a signature over another timestamp recovers some other key, never the root's
    other = verify_env_encrypt_public_key(LEGACY_PUB, sig_v1, APP_ID, ts + 1, now=ts)
    assert other != signer
    assert verify_env_encrypt_public_key(LEGACY_PUB, sig_v1[:64], APP_ID, ts, now=ts) is None
