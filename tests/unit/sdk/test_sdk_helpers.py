"""the sdk's offline helpers: env encryption, env-key signatures, compose hashes."""

from __future__ import annotations

import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pydstack.crypto.envcrypt import sign_env_pubkey
from pydstack.crypto.k256 import compressed_pubkey
from pydstack.sdk import (
    EnvVar,
    encrypt_env_vars,
    encrypt_env_vars_sync,
    get_compose_hash,
    verify_env_encrypt_public_key,
    verify_env_encrypt_public_key_legacy,
)
from pydstack.sdk.models import GetQuoteResponse


def _decrypt(secret: X25519PrivateKey, hex_blob: str) -> dict:
    blob = bytes.fromhex(hex_blob)
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    shared = secret.exchange(X25519PublicKey.from_public_bytes(blob[:32]))
    return json.loads(AESGCM(shared).decrypt(blob[32:44], blob[44:], None))


async def test_encrypt_env_vars_roundtrip():
    secret = X25519PrivateKey.generate()
    pub = secret.public_key().public_bytes_raw().hex()
    envs = [EnvVar("A", "1"), EnvVar("B", "ünïcode")]
    assert _decrypt(secret, encrypt_env_vars_sync(envs, pub)) == {
        "env": [{"key": "A", "value": "1"}, {"key": "B", "value": "ünïcode"}]
    }
    assert _decrypt(secret, await encrypt_env_vars(envs, "0x" + pub))["env"][0]["key"] == "A"
    with pytest.raises(ValueError, match="32 bytes"):
        encrypt_env_vars_sync(envs, "abcd")


def test_env_pubkey_signatures():
    pub = bytes.fromhex("e33a1832c6562067ff8f844a61e51ad051f1180b66ec2551fb0251735f3ee90a")
    sig = bytes.fromhex(
        "8542c49081fbf4e03f62034f13fbf70630bdf256a53032e38465a27c36fd6bed"
        "7a5e7111652004aef37f7fd92fbfc1285212c4ae6a6154203a48f5e16cad2cef00"
    )
    with pytest.warns(DeprecationWarning):
        assert verify_env_encrypt_public_key_legacy(pub, sig, "00" * 20) == (
            "0x0217610d74cbd39b6143842c6d8bc310d79da1d82cc9d17f8876376221eda0c38f"
        )
    root = bytes(31) + b"\x07"
    app_id = bytes(range(20))
    now = int(time.time())
    sig_v1 = sign_env_pubkey(root, app_id, pub, timestamp=now)
    assert verify_env_encrypt_public_key(pub, sig_v1, app_id.hex(), now) == (
        "0x" + compressed_pubkey(root).hex()
    )
    assert verify_env_encrypt_public_key(pub, sig_v1, app_id, now - 1) != (
        "0x" + compressed_pubkey(root).hex()
    )
    old = sign_env_pubkey(root, app_id, pub, timestamp=now - 1000)
    assert verify_env_encrypt_public_key(pub, old, app_id, now - 1000) is None
    assert verify_env_encrypt_public_key(pub, sig_v1, app_id, now + 3600) is None
    assert verify_env_encrypt_public_key(pub, b"\x00" * 10, app_id, now) is None


def test_compose_hash():
    a = {"runner": "docker-compose", "name": "x", "nested": {"b": 1, "a": [2, float("nan")]}}
    b = {"nested": {"a": [2, None], "b": 1}, "name": "x", "runner": "docker-compose"}
    assert get_compose_hash(a) == get_compose_hash(b)
    assert get_compose_hash({"name": "é"}) != get_compose_hash({"name": "e"})
    with_script = {**a, "bash_script": "echo", "pre_launch_script": ""}
    assert get_compose_hash(with_script, normalize=True) == get_compose_hash(a)
    assert get_compose_hash({**a, "x": None}) == get_compose_hash(a)


def test_replay_on_a_real_event_log(vectors):
    doc = json.loads((vectors / "dstack/verifier_quote-report.json").read_text())
    resp = GetQuoteResponse(quote=doc["quote"], event_log=doc["event_log"])
    quote = resp.decode_quote()
    rtmrs = resp.replay_rtmrs()
    for i in range(4):
        assert rtmrs[i] == quote[376 + 48 * i : 424 + 48 * i].hex()
