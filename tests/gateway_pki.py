"""a throwaway "KMS" PKI for gateway tests: a root CA, per-app CAs as the KMS derives them, and
CVM client certificates with the app-info extension (what the KMS signs for a CVM), plus a
gateway rpc certificate for a gateway app id."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.attest.identity import AppInfo
from pydstack.crypto.certs import CertRequest, cert_pem, generate_p256_key, issue_cert, key_pem


def app_info(app_id: str, instance_id: str, compose_hash: str = "") -> AppInfo:
    return AppInfo(
        app_id=bytes.fromhex(app_id),
        compose_hash=bytes.fromhex(compose_hash) if compose_hash else hashlib.sha256(b"c").digest(),
        instance_id=bytes.fromhex(instance_id),
        device_id=hashlib.sha256(b"").digest(),
        mr_system=b"\x01" * 32,
        mr_aggregated=b"\x02" * 32,
        os_image_hash=b"\x03" * 32,
        key_provider_info=b'{"name":"kms","id":"00"}',
    )


@dataclass
class KmsPki:
    root_key: ec.EllipticCurvePrivateKey = field(default_factory=generate_p256_key)

    def __post_init__(self) -> None:
        self.root = issue_cert(
            CertRequest("Dstack KMS CA", org_name="Dstack", ca_level=1),
            self.root_key.public_key(),
            self.root_key,
        )
        self._app_cas: dict[bytes, tuple[ec.EllipticCurvePrivateKey, object]] = {}

    @property
    def root_pem(self) -> str:
        return cert_pem(self.root)

    def app_ca(self, app_id: bytes) -> tuple[ec.EllipticCurvePrivateKey, object]:
        if app_id not in self._app_cas:
            key = generate_p256_key()
            cert = issue_cert(
                CertRequest(
                    "Dstack App CA", org_name="Dstack", ca_level=0, app_id=app_id,
                    special_usage="app:ca",
                ),
                key.public_key(),
                self.root_key,
                self.root,
            )  # fmt: skip
            self._app_cas[app_id] = (key, cert)
        return self._app_cas[app_id]

    def client_cert(
        self,
        info: AppInfo | None,
        *,
        app_id: bytes | None = None,
        attestation: bytes | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> tuple[str, str]:
        """(chain pem, key pem) of a CVM's client certificate signed with its app's CA."""
        app = app_id if app_id is not None else (info.app_id if info else os.urandom(20))
        ca_key, ca = self.app_ca(app)
        key = key or generate_p256_key()
        leaf = issue_cert(
            CertRequest(
                "dstack-guest-agent",
                usage_client_auth=True,
                app_id=app,
                special_usage="app:custom",
                app_info=None if info is None else info.to_msgpack(),
                attestation=attestation,
            ),
            key.public_key(),
            ca_key,
            ca,  # type: ignore[arg-type]
        )
        return cert_pem(leaf) + cert_pem(ca), key_pem(key)  # type: ignore[arg-type]

    def server_cert(self, app_id: bytes, *names: str) -> tuple[str, str]:
        """(chain pem, key pem) of a gateway rpc certificate for `app_id`."""
        ca_key, ca = self.app_ca(app_id)
        key = generate_p256_key()
        leaf = issue_cert(
            CertRequest(
                "dstack-gateway", alt_names=names, usage_server_auth=True,
                usage_client_auth=True, app_id=app_id, special_usage="app:custom",
            ),
            key.public_key(),
            ca_key,
            ca,  # type: ignore[arg-type]
        )  # fmt: skip
        return cert_pem(leaf) + cert_pem(ca), key_pem(key)  # type: ignore[arg-type]


def random_hex(n: int = 20) -> str:
    return os.urandom(n).hex()
