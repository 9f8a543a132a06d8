"""certificate signers for the agent's TLS keys."""

from __future__ import annotations

import dataclasses

from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.crypto.certs import CertRequest, cert_pem, issue_cert, load_cert_pem, load_key_pem

from .appkeys import AppKeys


class LocalCertSigner:
    """signs with the CA in `.appkeys.json` (key providers none/local/tpm, and the simulator):
    usage `app:custom`, chain `[leaf, ca]`."""

    def __init__(self, keys: AppKeys) -> None:
        if not keys.key_provider.key_pem or not keys.ca_cert:
            raise ValueError("appkeys carry no local ca key to sign certificates with")
        self.ca_key = load_key_pem(keys.key_provider.key_pem)
        self.ca_cert = load_cert_pem(keys.ca_cert)
        self.ca_pem = cert_pem(self.ca_cert)

    def sign(self, req: CertRequest, public_key: ec.EllipticCurvePublicKey) -> list[str]:
        req = dataclasses.replace(req, special_usage="app:custom")
        leaf = issue_cert(req, public_key, self.ca_key, self.ca_cert)
        return [cert_pem(leaf), self.ca_pem]
