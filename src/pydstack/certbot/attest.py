"""attestation of what the certbot makes: each issued key and the ACME account.

Report data follows upstream's ``QuoteContentType::Custom`` tags (gateway notes §5.5):
``sha512("zt-cert:" || SPKI DER)`` for a certificate key and ``sha512("acme-account:" ||
account URI)`` for the account, 64 bytes. An :data:`Attester` turns report data into
:class:`Quoted` evidence; the gateway passes :class:`AgentAttester` (its guest agent's GetQuote
and Attest), tests a simulated one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from pydstack.attest.report_data import to_report_data

log = logging.getLogger(__name__)

ZT_CERT = "zt-cert"
ACME_ACCOUNT = "acme-account"


def cert_report_data(spki_der: bytes) -> bytes:
    """what a quote carries to bind an issued certificate key."""
    return to_report_data(ZT_CERT, spki_der)


def account_report_data(account_uri: str) -> bytes:
    """what a quote carries to bind the ACME account."""
    return to_report_data(ACME_ACCOUNT, account_uri.encode())


@dataclass(frozen=True)
class Quoted:
    """evidence over some report data: `quote` is the guest agent's GetQuote answer as JSON text
    (``{"quote": hex, "event_log": json text, "report_data": hex, "vm_config": json text}``, what
    a dstack-verifier's ``/verify`` takes as is), `attestation` the versioned attestation of
    Attest (hex; empty when the agent has none)."""

    quote: str
    attestation: str


Attester = Callable[[bytes], Awaitable[Quoted]]


class AgentAttester:
    """an :data:`Attester` on a guest agent (``pydstack.sdk`` client, or any object with the
    same async ``get_quote`` and ``attest``)."""

    def __init__(self, endpoint: str | None = None) -> None:
        from pydstack.sdk.client import AsyncDstackClient

        self.client = AsyncDstackClient(endpoint)

    async def __call__(self, report_data: bytes) -> Quoted:
        q = await self.client.get_quote(report_data)
        quote = json.dumps(
            {
                "quote": q.quote,
                "event_log": q.event_log,
                "report_data": q.report_data,
                "vm_config": q.vm_config,
            }
        )
        try:
            attestation = (await self.client.attest(report_data)).attestation
        except httpx.HTTPStatusError as e:
            # an older agent without Attest: the quote alone still binds the key
            log.info("the guest agent gives no attestation: %s", e)
            attestation = ""
        return Quoted(quote, attestation)
