"""what the certbot needs from a DNS provider: TXT records for DNS-01 and CAA records.

A :class:`DnsProvider` creates a record and answers with an id, lists the records at a name,
and deletes one by id. Records come back as :class:`DnsRecord` with the text `content` of the
record (for CAA ``<flags> <tag> "<value>"``, Cloudflare's rendering), so callers treat every
provider alike. Failures are :class:`~.errors.DnsProviderError` with the provider's answer and
never the credential.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .errors import DnsProviderError
from .model import CloudflareProvider, DnsProviderConfig, Rfc2136Provider

TXT, CAA = "TXT", "CAA"
ACME_CHALLENGE = "_acme-challenge"


@dataclass(frozen=True)
class DnsRecord:
    id: str
    name: str
    type: str
    content: str

    @property
    def caa_tag(self) -> str | None:
        """the tag of a CAA record (its content's second token), None for other records."""
        parts = self.content.split()
        return parts[1] if self.type == CAA and len(parts) >= 3 else None


def same_name(a: str, b: str) -> bool:
    """DNS names compare without case and without a trailing dot."""
    return a.rstrip(".").lower() == b.rstrip(".").lower()


def caa_content(flags: int, tag: str, value: str) -> str:
    return f'{flags} {tag} "{value}"'


class DnsProvider(Protocol):
    async def add_txt(self, fqdn: str, value: str, ttl: int) -> str:
        """creates a TXT record; its id."""
        ...

    async def add_caa(self, name: str, flags: int, tag: str, value: str) -> str:
        """creates a CAA record; its id."""
        ...

    async def list_records(self, fqdn: str, rtype: str) -> list[DnsRecord]:
        """the records of type `rtype` at exactly `fqdn`."""
        ...

    async def delete_record(self, record_id: str) -> None:
        """deletes a record by the id it was listed or created with."""
        ...

    async def check(self) -> None:
        """that the credential works for the domain (the zone resolves); DnsProviderError."""
        ...

    async def aclose(self) -> None: ...


def make_provider(config: DnsProviderConfig, domain: str) -> DnsProvider:
    """the provider a credential describes, for names under `domain`."""
    if isinstance(config, CloudflareProvider):
        from .cloudflare import CloudflareDns

        return CloudflareDns(config.api_token, domain, api_url=config.api_url)
    if isinstance(config, Rfc2136Provider):
        from .rfc2136 import Rfc2136Dns

        return Rfc2136Dns(config, domain)
    raise DnsProviderError(f"unsupported dns provider {type(config).__name__}")
