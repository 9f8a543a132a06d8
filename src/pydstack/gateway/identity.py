"""who calls RegisterCvm (§1.2, §1.3 step 1): the app identity in the caller's RA-TLS client
certificate, and the optional authorization webhook (``[core.auth]``).

The main server's TLS already verified the client certificate's chain to ``tls.mutual.ca_certs``
(the KMS root CA) before any handler runs. :func:`caller_identity` then reads, in order:

1. the app-info extension (``1.3.6.1.4.1.62397.1.9``, which the KMS writes from the CVM's
   verified attestation when it signs); when the certificate also names an app id
   (``...1.3``) it must be the app-info's;
2. else the attestation the certificate carries, bound to its key and verified with the
   project's one evidence path (:class:`~pydstack.attest.evidence.EvidenceVerifier`: DCAP under
   ``[core.attestation]``'s root, RTMR3 replay), its app info decoded from the verified event
   log; ``core.debug.insecure_skip_attestation`` decodes it without the DCAP check (tests only);
3. else :class:`IdentityError` "neither app-info nor attestation provided".

No certificate, a malformed one, an attestation that fails, an empty app id or instance id: an
:class:`IdentityError` (an :class:`~pydstack.errors.InputError`) saying which. Ids are lower-case
hex without ``0x``.

:class:`AuthWebhook` posts the caller's app info as JSON (hex strings) to ``core.auth.url``; any
answer but 2xx, a timeout or an unreachable webhook refuses the registration (fail closed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
from cryptography import x509

from pydstack.attest.errors import AttestError
from pydstack.attest.evidence import EvidenceVerifier
from pydstack.attest.identity import AppInfo
from pydstack.attest.ratls import parse_ratls_cert, verify_cert_binding
from pydstack.errors import DstackError, InputError

log = logging.getLogger(__name__)

#: upstream's wire string for a certificate with neither
NO_APP_INFO = "neither app-info nor attestation provided"


class IdentityError(InputError):
    """the caller's identity cannot be established."""


class AuthDenied(DstackError):
    """the authorization webhook refused (or could not be asked about) a registration."""


@dataclass(frozen=True)
class CallerIdentity:
    app_id: str
    instance_id: str
    compose_hash: str
    app_info: AppInfo | None = None

    def webhook_body(self) -> dict[str, Any]:
        """upstream's AppInfo JSON (hex strings) for the webhook."""
        a = self.app_info
        if a is None:
            return {
                "app_id": self.app_id,
                "instance_id": self.instance_id,
                "compose_hash": self.compose_hash,
            }
        body: dict[str, Any] = {
            "app_id": a.app_id.hex(),
            "compose_hash": a.compose_hash.hex(),
            "instance_id": a.instance_id.hex(),
            "device_id": a.device_id.hex(),
            "mr_system": a.mr_system.hex(),
            "mr_aggregated": a.mr_aggregated.hex(),
            "os_image_hash": a.os_image_hash.hex(),
            "key_provider_info": a.key_provider_info.hex(),
        }
        if a.init_script_hashes is not None:
            body["init_script_hashes"] = [h.hex() for h in a.init_script_hashes]
        return body


def identity_of(app: AppInfo) -> CallerIdentity:
    """the ids of an app info; IdentityError when the app id or instance id is empty."""
    if not app.app_id or not app.instance_id:
        raise IdentityError("app_id or instance_id is empty")
    return CallerIdentity(app.app_id.hex(), app.instance_id.hex(), app.compose_hash.hex(), app)


async def caller_identity(
    cert: x509.Certificate | None,
    verifier: EvidenceVerifier | None,
    *,
    skip_attestation: bool = False,
) -> CallerIdentity:
    """the caller's identity from its (already chain-verified) client certificate."""
    if cert is None:
        raise IdentityError(
            "client authentication is required: register with the cvm's ra-tls client certificate"
        )
    try:
        info = parse_ratls_cert(cert)
        if info.app_info is not None:
            app = AppInfo.from_msgpack(info.app_info)
            if info.app_id is not None and info.app_id != app.app_id:
                raise IdentityError("the certificate's app id is not its app info's")
            return identity_of(app)
        if info.attestation is None and info.legacy_quote is None:
            raise IdentityError(NO_APP_INFO)
        att = verify_cert_binding(cert)
    except AttestError as e:
        raise IdentityError(f"invalid client certificate: {e}") from None
    if skip_attestation:
        try:
            return identity_of(AppInfo.from_attestation(att, boottime_mr=False))
        except AttestError as e:
            raise IdentityError(f"invalid client attestation: {e}") from None
    if verifier is None:
        raise IdentityError("attestation cannot be verified: no verifier configured")
    result = await verifier.verify(att, check_image=False, fail_fast=True)
    if result.failures or result.app_info is None:
        reason = result.reason or "no verified identity"
        raise IdentityError(f"attestation refused: {reason}")
    return identity_of(result.app_info)


class AuthWebhook:
    """``[core.auth]``: POST the app info to `url`; 2xx admits, anything else refuses."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout

    async def check(self, caller: CallerIdentity) -> None:
        """AuthDenied unless the webhook answers 2xx within the timeout."""
        t = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with (
                aiohttp.ClientSession(timeout=t) as s,
                s.post(self.url, json=caller.webhook_body()) as r,
            ):
                status = r.status
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            log.warning("auth webhook %s failed: %s", self.url, type(e).__name__)
            raise AuthDenied("app authorization failed: the auth webhook is unreachable") from None
        if not 200 <= status < 300:
            log.info("auth webhook refused app %s (http %d)", caller.app_id, status)
            raise AuthDenied(f"app authorization failed: the auth webhook answered {status}")
