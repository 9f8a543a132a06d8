"""stand-ins for the certbot's unit tests: a DNS provider in memory and an ACME backend that
issues from a local CA (the real ones are exercised by the integration tests)."""

from __future__ import annotations

import datetime as dt
import itertools

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pydstack.certbot.acme_client import IssuedCert, new_key_pem, parse_chain, set_caa_records
from pydstack.certbot.dns01 import CAA, TXT, DnsRecord, caa_content, same_name
from pydstack.certbot.errors import AcmeRefusedError, AcmeUnavailableError, DnsProviderError
from pydstack.certbot.model import AcmeCredentials


class MemoryDns:
    """a DnsProvider over a dict; `refuse(type, name, content)` returning a reason refuses."""

    def __init__(self) -> None:
        self.records: dict[str, DnsRecord] = {}
        self._ids = itertools.count(1)
        self.refuse = None
        self.checked = 0
        self.closed = 0
        self.broken = False

    async def _add(self, name, rtype, content):
        if self.refuse is not None and (why := self.refuse(rtype, name, content)):
            raise DnsProviderError(f"memory dns refused: {why}")
        rid = f"r{next(self._ids)}"
        self.records[rid] = DnsRecord(rid, name, rtype, content)
        return rid

    async def add_txt(self, fqdn, value, ttl):
        return await self._add(fqdn, TXT, value)

    async def add_caa(self, name, flags, tag, value):
        return await self._add(name, CAA, caa_content(flags, tag, value))

    async def list_records(self, fqdn, rtype):
        return [r for r in self.records.values() if r.type == rtype and same_name(r.name, fqdn)]

    async def delete_record(self, record_id):
        if record_id not in self.records:
            raise DnsProviderError(f"no record {record_id}")
        del self.records[record_id]

    async def check(self):
        self.checked += 1
        if self.broken:
            raise DnsProviderError("no matching zone found for base_domain")

    async def aclose(self):
        self.closed += 1

    def contents(self, rtype, name=None):
        return sorted(
            r.content
            for r in self.records.values()
            if r.type == rtype and (name is None or same_name(r.name, name))
        )


class LocalCaBackend:
    """an AcmeBackend that signs `*.domain` with a local CA; `down` answers unavailable for that
    many calls, `refuse` refuses every order."""

    def __init__(self, days: int = 90) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unit test ca")])
        self.days = days
        self.down = 0
        self.refuse = False
        self.accounts: list[str] = []
        self.orders: list[str] = []
        self.caa: list[tuple[str, str, str]] = []

    async def create_account(self, directory_url):
        if self.down:
            self.down -= 1
            raise AcmeUnavailableError("acme account creation: server unreachable or too slow")
        uri = f"{directory_url.rsplit('/', 1)[0]}/acct/{len(self.accounts) + 1}"
        self.accounts.append(uri)
        key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return AcmeCredentials(uri, directory_url, key)

    async def issue(self, creds, domain, provider, *, txt_ttl, max_dns_wait, timeout):
        self.orders.append(domain)
        if self.down:
            self.down -= 1
            raise AcmeUnavailableError("acme new order: server unreachable or too slow")
        if self.refuse:
            raise AcmeRefusedError("acme new order: rejectedIdentifier: no")
        key, key_pem = new_key_pem()
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=self.days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(f"*.{domain}")]), False)
            .sign(self.key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM).decode()
        not_after, spki = parse_chain(chain, key)
        return IssuedCert(chain, key_pem, not_after, spki)

    async def set_caa(self, creds, provider, domain, issuer):
        self.caa.append((creds.account_id, domain, issuer))
        await set_caa_records(provider, domain, issuer, creds.account_id)
