"""per-app key derivation from the KMS roots, exactly as upstream.

* k256_key = HKDF(root k256, app_id || "app-key"); k256_signature = the root's recoverable
  signature of keccak256("dstack-kms-issued:" || app_id || compressed app pubkey)
* disk key = derive_dh_secret(root CA, app_id || instance_id || "app-disk-crypt-key")
* env key = derive_dh_secret(root CA, app_id || "env-encrypt-key"); its X25519 public key is
  signed as "dstack-env-encrypt-pubkey" (legacy, and v1 with a big-endian u64 timestamp)
* app CA key = derive_p256_key(root CA, app_id || "app-ca")

Key epochs (off by default): epoch N > 0 first derives the roots with
HKDF(root, "dstack-kms-key-epoch:" || u32be(N)), so a KMS can rotate to fresh roots while old
epochs stay derivable. Epoch 0 is upstream's derivation, byte for byte.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.crypto.certs import CertRequest, issue_cert
from pydstack.crypto.envcrypt import sign_env_pubkey, x25519_public
from pydstack.crypto.k256 import compressed_pubkey, sign_message
from pydstack.crypto.kdf import (
    derive_dh_secret,
    derive_key,
    derive_p256_key,
    p256_key_from_bytes,
    p256_scalar,
)


@dataclass(frozen=True)
class AppKeyMaterial:
    disk_crypt_key: bytes
    env_crypt_key: bytes
    k256_key: bytes
    k256_signature: bytes


def epoch_roots(
    root_ca: ec.EllipticCurvePrivateKey, root_k256: bytes, epoch: int
) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    if epoch == 0:
        return root_ca, root_k256
    tag = b"dstack-kms-key-epoch:" + epoch.to_bytes(4, "big")
    ca = p256_key_from_bytes(derive_key(p256_scalar(root_ca), [tag, b"ca"]))
    return ca, derive_key(root_k256, [tag, b"k256"])


def derive_app_keys(
    root_ca: ec.EllipticCurvePrivateKey,
    root_k256: bytes,
    app_id: bytes,
    instance_id: bytes,
    epoch: int = 0,
) -> AppKeyMaterial:
    if len(app_id) != 20:
        raise ValueError("app_id must be 20 bytes")
    ca, k256 = epoch_roots(root_ca, root_k256, epoch)
    app_k256 = derive_key(k256, [app_id, b"app-key"])
    return AppKeyMaterial(
        disk_crypt_key=derive_dh_secret(ca, [app_id, instance_id, b"app-disk-crypt-key"]),
        env_crypt_key=derive_dh_secret(ca, [app_id, b"env-encrypt-key"]),
        k256_key=app_k256,
        k256_signature=sign_message(k256, "dstack-kms-issued", app_id, compressed_pubkey(app_k256)),
    )


@dataclass(frozen=True)
class EnvPublicKey:
    public_key: bytes
    signature: bytes
    timestamp: int
    signature_v1: bytes


def env_public_key(
    root_ca: ec.EllipticCurvePrivateKey, root_k256: bytes, app_id: bytes, epoch: int = 0
) -> EnvPublicKey:
    if len(app_id) != 20:
        raise ValueError("app_id must be 20 bytes")
    ca, k256 = epoch_roots(root_ca, root_k256, epoch)
    pub = x25519_public(derive_dh_secret(ca, [app_id, b"env-encrypt-key"]))
    ts = int(time.time())
    return EnvPublicKey(
        public_key=pub,
        signature=sign_env_pubkey(k256, app_id, pub),
        timestamp=ts,
        signature_v1=sign_env_pubkey(k256, app_id, pub, timestamp=ts),
    )


def app_ca(
    root_ca: ec.EllipticCurvePrivateKey, root_cert: x509.Certificate, app_id: bytes
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = derive_p256_key(root_ca, [app_id, b"app-ca"])
    cert = issue_cert(
        CertRequest(
            "Dstack App CA", org_name="Dstack", ca_level=0, app_id=app_id, special_usage="app:ca"
        ),
        key.public_key(),
        root_ca,
        root_cert,
    )
    return key, cert
