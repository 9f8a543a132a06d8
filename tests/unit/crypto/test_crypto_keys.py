"""key derivations, signature chains and env encryption against upstream's vectors."""

from __future__ import annotations

import base64
import json

import pytest

from pydstack.crypto import ed25519, k256
from pydstack.crypto.envcrypt import (
    EnvError,
    decrypt_env,
    encrypt_env,
    filter_allowed_envs,
    recover_env_pubkey_signer,
    sign_env_pubkey,
    verify_env_encrypt_public_key,
    x25519_public,
)
from pydstack.crypto.kdf import derive_dh_secret, derive_key, p256_key_from_bytes, p256_pkcs8_der

ROOT_SCALAR = bytes.fromhex("f57527cea4ab7ffb49af99b158cdc0e3ec06398f528349ea236b7d2afe19cec1")
APP_ID = bytes.fromhex("5bb4ff9a3837357f19dc176407a5709c62eb6c56")


@pytest.fixture(scope="module")
def appkeys(vectors):
    return json.loads((vectors / "dstack/simulator_appkeys.json").read_text())


def test_derive_dh_secret_stable_vector():
    key = p256_key_from_bytes(ROOT_SCALAR)
    der = p256_pkcs8_der(key)
    assert len(der) == 138 and der.endswith(bytes.fromhex("a690cbf930b775897b27"))
    secret = derive_dh_secret(key, [b"context one", b"context two"])
    assert secret.hex() == "663afd58820be8ad645f9c035e93199d114ab16f738db62393bc1d7d623e8813"
    assert derive_dh_secret(ROOT_SCALAR, [b"context one", b"context two"]) == secret
    assert derive_key(b"ikm", [b"a", b"b"]) == derive_key(b"ikm", [b"ab"])


def test_getkey_vectors(appkeys):
    app_key = bytes.fromhex(appkeys["k256_key"])
    kms_sig = bytes.fromhex(appkeys["k256_signature"])
    key, chain = k256.get_key_chain(app_key, "/test/path", "test-purpose", "secp256k1", kms_sig)
    assert key.hex() == "b9fbb7171185c421c58610a2acba8ceae93623ae47815618cbad1e98fc042cb7"
    derived_pub = k256.compressed_pubkey(key)
    assert derived_pub.hex() == (
        "02c1082e78670feed1c847db81dbd71be37e4d53200a746c0a89f0afa8173cf566"
    )
    assert chain[0].hex() == (
        "f50c51735a97072f0c98125ed61fc84e2fdb36e95990b9e57337dadc0e2a9712"
        "227f04e07209faecb8891d59ec144a6c13e411dc90b3423f28071bd3fe11978d01"
    )
    assert chain[1] == kms_sig
    # the chain verifies: app key signed the derived key, the kms signed the app key
    msg = k256.keccak256(f"test-purpose:{derived_pub.hex()}".encode())
    app_pub = k256.recover_pubkey(msg, chain[0])
    assert app_pub.hex() == "02818494263695e8839122dbd88e281d7380622999df4e60a14befa0f2d096fc7c"
    kms_pub = k256.recover_pubkey(
        k256.keccak256(b"dstack-kms-issued:" + APP_ID + app_pub), chain[1]
    )
    assert kms_pub.hex() == "0321529e458424ab1f710a3a57ec4dad2fb195ddca572f7469242ba6c7563085b6"
    assert k256.get_key_chain(app_key, "", "", "secp256k1", b"")[0].hex() == (
        "aa221ae548b5a8f52fcb8687cfd873712f6a1232b2717e5ee3d58ab74f21905b"
    )
    assert k256.get_key_chain(app_key, "/", "test", "secp256k1", b"")[0].hex() == (
        "f6c1ed94488394d78e0a4e5ab75d62e9f085d73b0b555d0614fb90ca13d9464d"
    )
    ed_key, _ = k256.get_key_chain(app_key, "/ed", "test", "ed25519", b"")
    assert ed25519.public_key(ed_key).hex() == (
        "8f1d48d1ddd1dff13588a9a0366979555f0ab67292461b8be401a8903b163dcc"
    )
    with pytest.raises(ValueError, match="Unsupported algorithm"):
        k256.get_key_chain(app_key, "", "", "rsa", b"")


def test_app_key_report_data_strings():
    key = derive_key(
        bytes.fromhex("1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b"), [b"vms"]
    )
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()  # noqa: E731
    assert b64(k256.compressed_pubkey(key)) == "A6t_JdVkVdMAocH3f1f20WGT6JzdntxcXimUtEax8zc9"
    assert b64(ed25519.public_key(key)) == "5Pbre1Amf1hrp2V2bbfKlIfxpQb2pJAmrgmhxgVoG9s"


def test_ecdsa_sign_verify():
    key = bytes(31) + b"\x05"
    pub = k256.compressed_pubkey(key)
    sig = k256.sign_ecdsa(key, b"data")
    assert k256.verify_ecdsa(pub, b"data", sig)
    assert not k256.verify_ecdsa(pub, b"other", sig)
    digest = bytes(range(32))
    assert k256.verify_ecdsa(
        pub, digest, k256.sign_ecdsa(key, digest, prehashed=True), prehashed=True
    )
    with pytest.raises(ValueError):
        k256.verify_ecdsa(b"\x02" + bytes(32), b"data", sig)
    with pytest.raises(ValueError):
        k256.verify_ecdsa(pub, b"data", sig[:10])
    ed = bytes(32)
    assert ed25519.verify(ed25519.public_key(ed), b"m", ed25519.sign(ed, b"m"))
    assert not ed25519.verify(ed25519.public_key(ed), b"n", ed25519.sign(ed, b"m"))
    with pytest.raises(ValueError, match="invalid public key"):
        ed25519.verify(b"short", b"m", bytes(64))


def test_env_pubkey_signature_vectors():
    pub = bytes.fromhex("e33a1832c6562067ff8f844a61e51ad051f1180b66ec2551fb0251735f3ee90a")
    sig = bytes.fromhex(
        "8542c49081fbf4e03f62034f13fbf70630bdf256a53032e38465a27c36fd6bed"
        "7a5e7111652004aef37f7fd92fbfc1285212c4ae6a6154203a48f5e16cad2cef00"
    )
    assert recover_env_pubkey_signer(bytes(20), pub, sig).hex() == (
        "0217610d74cbd39b6143842c6d8bc310d79da1d82cc9d17f8876376221eda0c38f"
    )
    root = bytes(31) + b"\x09"
    sig_v1 = sign_env_pubkey(root, APP_ID, pub, timestamp=1_700_000_000)
    signer = verify_env_encrypt_public_key(pub, sig_v1, APP_ID, 1_700_000_000, now=1_700_000_100)
    assert signer == k256.compressed_pubkey(root)
    assert (
        verify_env_encrypt_public_key(pub, sig_v1, APP_ID, 1_700_000_000, now=1_700_001_000) is None
    )
    assert (
        verify_env_encrypt_public_key(pub, sig_v1, APP_ID, 1_700_000_000, now=1_699_999_000) is None
    )


def test_upstream_env_decrypt_vector():
    secret = bytes.fromhex("7c282bf94b35dc47801dc953bfa0896fc2bd313381d3e8eca4e42f6536d2a96f")
    blob = bytes.fromhex(
        "0bd18749612f4c8b9dd583c7d6a646b90abd34e3c731a7708d0caf9039095641e1f0948e775f0b73"
        "51788db7f246d51806954626dcccb6a60d64665ca3715c6bef75616cab476d27bba04080361200d6a58cec"
    )
    assert x25519_public(secret).hex() == (
        "b5ee2e67280ef8c9540850e90e6b7ee1b5e7ef011301bde95a2e6f953d04d201"
    )
    assert decrypt_env(secret, blob) == [("", "")]


def test_env_encryption_roundtrip_and_limits():
    secret = bytes(range(32))
    blob = encrypt_env([("API_KEY", "s3cr3t"), ("OTHER", "x")], x25519_public(secret))
    assert decrypt_env(secret, blob) == [("API_KEY", "s3cr3t"), ("OTHER", "x")]
    with pytest.raises(EnvError, match="failed to decrypt"):
        decrypt_env(bytes(31) + b"\x01", blob)
    with pytest.raises(EnvError, match="too short"):
        decrypt_env(secret, blob[:20])
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(EnvError):
        decrypt_env(secret, bytes(tampered))
    kept, dropped = filter_allowed_envs(
        [("API_KEY", "1"), ("NOPE", "2"), ("bad-key", "3")], ["API_KEY", "bad-key"]
    )
    assert kept == [("API_KEY", "1")] and dropped == ["NOPE", "bad-key"]
    many = encrypt_env([(f"K{i}", "") for i in range(1025)], x25519_public(secret))
    with pytest.raises(EnvError, match="too many env vars"):
        decrypt_env(secret, many)
    big = encrypt_env([("K", "x" * (128 * 1024 + 1))], x25519_public(secret))
    with pytest.raises(EnvError, match="size limits"):
        decrypt_env(secret, big)
