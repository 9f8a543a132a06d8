"""the KMS's root material on disk (`core.cert_dir`), upstream's file names.

root-ca.key/.crt (P-256, "Dstack KMS CA", pathlen 1), root-k256.key (raw 32-byte scalar),
tmp-ca.key/.crt ("Dstack Client Temp CA", pathlen 0; its key is public by design: trust comes
from the attestation in client certificates), rpc.key/.crt (the TLS server certificate for the
domain, usage `kms:rpc`). Keys are written 0600.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.crypto.certs import (
    CertRequest,
    cert_pem,
    generate_p256_key,
    issue_cert,
    key_pem,
    load_cert_pem,
    load_key_pem,
    spki_der,
)
from pydstack.crypto.k256 import compressed_pubkey

FILES = (
    "root-ca.key",
    "root-ca.crt",
    "root-k256.key",
    "tmp-ca.key",
    "tmp-ca.crt",
    "rpc.key",
    "rpc.crt",
)


def write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


@dataclass
class KmsKeys:
    root_ca_key: ec.EllipticCurvePrivateKey
    root_ca_cert: x509.Certificate
    root_k256: bytes
    tmp_ca_key: ec.EllipticCurvePrivateKey
    tmp_ca_cert: x509.Certificate
    rpc_key: ec.EllipticCurvePrivateKey
    rpc_cert: x509.Certificate

    @property
    def k256_pubkey(self) -> bytes:
        return compressed_pubkey(self.root_k256)

    @property
    def ca_pem(self) -> str:
        return cert_pem(self.root_ca_cert)


def ca_certs(
    root_key: ec.EllipticCurvePrivateKey, tmp_key: ec.EllipticCurvePrivateKey
) -> tuple[x509.Certificate, x509.Certificate]:
    root = issue_cert(
        CertRequest("Dstack KMS CA", org_name="Dstack", ca_level=1), root_key.public_key(), root_key
    )
    tmp = issue_cert(
        CertRequest("Dstack Client Temp CA", org_name="Dstack", ca_level=0),
        tmp_key.public_key(),
        tmp_key,
    )
    return root, tmp


def rpc_cert(
    domain: str,
    key: ec.EllipticCurvePrivateKey,
    root_key: ec.EllipticCurvePrivateKey,
    root_cert: x509.Certificate,
    attestation: bytes | None = None,
) -> x509.Certificate:
    return issue_cert(
        CertRequest(
            domain,
            alt_names=(domain,),
            usage_server_auth=True,
            special_usage="kms:rpc",
            attestation=attestation,
        ),
        key.public_key(),
        root_key,
        root_cert,
    )


class KeyStore:
    def __init__(self, cert_dir: Path) -> None:
        self.dir = cert_dir

    def exists(self) -> bool:
        return all((self.dir / f).exists() for f in FILES)

    def any_root(self) -> bool:
        return (self.dir / "root-ca.key").exists() or (self.dir / "root-k256.key").exists()

    def store(
        self,
        root_ca_key: ec.EllipticCurvePrivateKey,
        root_k256: bytes,
        tmp_ca_key: ec.EllipticCurvePrivateKey,
        domain: str,
        attest: Callable[[bytes], bytes] | None = None,
    ) -> KmsKeys:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        root_cert, tmp_cert = ca_certs(root_ca_key, tmp_ca_key)
        rpc_key = generate_p256_key()
        attestation = attest(spki_der(rpc_key.public_key())) if attest is not None else None
        rpc = rpc_cert(domain, rpc_key, root_ca_key, root_cert, attestation)
        write_secret(self.dir / "root-ca.key", key_pem(root_ca_key).encode())
        (self.dir / "root-ca.crt").write_text(cert_pem(root_cert))
        write_secret(self.dir / "root-k256.key", root_k256)
        write_secret(self.dir / "tmp-ca.key", key_pem(tmp_ca_key).encode())
        (self.dir / "tmp-ca.crt").write_text(cert_pem(tmp_cert))
        write_secret(self.dir / "rpc.key", key_pem(rpc_key).encode())
        (self.dir / "rpc.crt").write_text(cert_pem(rpc) + cert_pem(root_cert))
        (self.dir / "rpc-domain").write_text(domain)
        return self.load()

    def generate(self, domain: str, attest: Callable[[bytes], bytes] | None = None) -> KmsKeys:
        if self.any_root():
            raise ValueError("KMS has already been bootstrapped")
        return self.store(generate_p256_key(), os.urandom(32), generate_p256_key(), domain, attest)

    def load(self) -> KmsKeys:
        missing = [f for f in FILES if not (self.dir / f).exists()]
        if missing:
            raise FileNotFoundError(f"kms keys missing in {self.dir}: {', '.join(missing)}")
        k256 = (self.dir / "root-k256.key").read_bytes()
        if len(k256) != 32:
            raise ValueError("root-k256.key must hold a raw 32-byte scalar")
        return KmsKeys(
            root_ca_key=load_key_pem((self.dir / "root-ca.key").read_bytes()),
            root_ca_cert=load_cert_pem((self.dir / "root-ca.crt").read_bytes()),
            root_k256=k256,
            tmp_ca_key=load_key_pem((self.dir / "tmp-ca.key").read_bytes()),
            tmp_ca_cert=load_cert_pem((self.dir / "tmp-ca.crt").read_bytes()),
            rpc_key=load_key_pem((self.dir / "rpc.key").read_bytes()),
            rpc_cert=load_cert_pem((self.dir / "rpc.crt").read_bytes()),
        )
