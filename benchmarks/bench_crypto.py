"""key derivations, GetKey signature chains, env decryption and certificate issuing per second
on one core (figures only; nothing is asserted about time).

BENCH_SECONDS (default 1.5) sets how long each row runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import rate, row
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pydstack.attest.ratls import parse_ratls_cert
from pydstack.crypto import k256
from pydstack.crypto.certs import CertRequest, generate_p256_key, issue_cert, spki_der
from pydstack.crypto.csr import CONFIRM, CertConfigV2, CertSigningRequestV2
from pydstack.crypto.envcrypt import decrypt_env, encrypt_env, x25519_public
from pydstack.crypto.kdf import derive_dh_secret, derive_key, derive_p256_key, p256_key_from_bytes


def main() -> None:
    secs = float(os.environ.get("BENCH_SECONDS", "1.5"))
    app_id = bytes.fromhex("5bb4ff9a3837357f19dc176407a5709c62eb6c56")
    k256_root = bytes.fromhex("2c" * 32)
    root_ca = p256_key_from_bytes(bytes.fromhex("f57527cea4ab7ffb49af99b158cdc0e3" * 2))
    app_key = derive_key(k256_root, [app_id, b"app-key"])
    kms_sig = k256.sign_message(
        k256_root, "dstack-kms-issued", app_id, k256.compressed_pubkey(app_key)
    )
    env_secret = derive_dh_secret(root_ca, [app_id, b"env-encrypt-key"])
    env_blob = encrypt_env([(f"VAR_{i}", "x" * 64) for i in range(16)], x25519_public(env_secret))
    ca_key = generate_p256_key()
    ca = issue_cert(
        CertRequest("Dstack App CA", org_name="Dstack", ca_level=0), ca_key.public_key(), ca_key
    )
    leaf_key = generate_p256_key()
    att = b"\x00" + bytes(4000)
    leaf = issue_cert(
        CertRequest("app", app_id=app_id, special_usage="app:custom", attestation=att),
        leaf_key.public_key(),
        ca_key,
        ca,
    )
    leaf_der = leaf.public_bytes(serialization.Encoding.DER)
    csr = CertSigningRequestV2(
        CONFIRM,
        spki_der(leaf_key.public_key()),
        CertConfigV2(None, "app.example", ("app.example",), True, False, True),
        att,
    )
    csr_sig = csr.sign(leaf_key)
    raw_csr = csr.encode()
    digest = k256.keccak256(b"bench")
    rec_sig = k256.sign_recoverable(app_key, digest)

    cases = [
        ("derive_key (hkdf-sha256, 32 B)", lambda: derive_key(app_key, [b"/wallet/eth"])),
        ("derive_p256_key", lambda: derive_p256_key(root_ca, [app_id, b"app-ca"])),
        (
            "derive_dh_secret (p-256 + pkcs#8 + sha256)",
            lambda: derive_dh_secret(root_ca, [app_id, b"env-encrypt-key"]),
        ),
        (
            "GetKey chain (hkdf + pubkey + keccak + sign)",
            lambda: k256.get_key_chain(app_key, "/wallet/eth", "ethereum", "secp256k1", kms_sig),
        ),
        (
            "GetKey chain, ed25519",
            lambda: k256.get_key_chain(app_key, "/wallet/sol", "solana", "ed25519", kms_sig),
        ),
        ("secp256k1 recover (compressed pubkey)", lambda: k256.recover_pubkey(digest, rec_sig)),
        ("env decrypt (16 vars, x25519 + aes-gcm)", lambda: decrypt_env(env_secret, env_blob)),
        (
            "issue leaf cert (4 KB attestation, by CA)",
            lambda: issue_cert(
                CertRequest("app", app_id=app_id, special_usage="app:custom", attestation=att),
                leaf_key.public_key(),
                ca_key,
                ca,
            ),
        ),
        (
            "load cert der + parse ra-tls extensions",
            lambda: parse_ratls_cert(x509.load_der_x509_certificate(leaf_der)),
        ),
        ("csr encode + sign", lambda: csr.sign(leaf_key)),
        ("csr decode + verify", lambda: CertSigningRequestV2.decode(raw_csr).verify(csr_sig)),
    ]
    print(f"pydstack crypto, {secs:.1f} s per row, one core")
    for name, fn in cases:
        per_s, lat = rate(fn, secs)
        print(row(name, per_s, lat))


if __name__ == "__main__":
    main()
