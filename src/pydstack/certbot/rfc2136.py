"""RFC 2136 dynamic updates, signed with TSIG, to any authoritative server (bind9, knot, ...).

Records are changed with UPDATE messages over TCP to the configured server and listed by asking
that same server (TCP, the answer TSIG-verified). A record's id is its own description (name,
type and rdata, base64url JSON), so a delete removes exactly that record and nothing else with
the same name. The zone is configured, or found by asking the server for the SOA of the domain
(the answer's, or the authority section's owner).

A refused update (NOTAUTH, REFUSED, a bad key...) is a :class:`DnsProviderError` naming the
rcode; the TSIG secret is never in a message.
"""

from __future__ import annotations

import base64
import binascii
import json

import dns.asyncquery
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CAA
import dns.rdtypes.ANY.TXT
import dns.tsig
import dns.tsigkeyring
import dns.update

from pydstack.types import jsonlimits

from .dns01 import CAA, TXT, DnsRecord, caa_content
from .errors import DnsProviderError
from .model import Rfc2136Provider, split_server

TIMEOUT = 10.0
MAX_ID = 4096


def _txt_value(rd: dns.rdata.Rdata) -> str:
    assert isinstance(rd, dns.rdtypes.ANY.TXT.TXT)
    return b"".join(rd.strings).decode("utf-8", "replace")


def _content(rtype: str, rd: dns.rdata.Rdata) -> str:
    if rtype == TXT:
        return _txt_value(rd)
    if isinstance(rd, dns.rdtypes.ANY.CAA.CAA):
        return caa_content(rd.flags, rd.tag.decode(), rd.value.decode("utf-8", "replace"))
    return rd.to_text()


def _encode_id(name: str, rtype: str, rdata: str) -> str:
    raw = json.dumps([name, rtype, rdata], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _decode_id(record_id: str) -> tuple[str, str, str]:
    if len(record_id) > MAX_ID:
        raise DnsProviderError("rfc2136 record id is too long")
    try:
        raw = base64.urlsafe_b64decode(record_id + "=" * (-len(record_id) % 4))
        name, rtype, rdata = jsonlimits.loads(raw)
    except (binascii.Error, ValueError, TypeError) as e:
        raise DnsProviderError("rfc2136 record id is not one this provider made") from e
    if not all(isinstance(x, str) for x in (name, rtype, rdata)) or rtype not in (TXT, CAA):
        raise DnsProviderError("rfc2136 record id is not one this provider made")
    return name, rtype, rdata


class Rfc2136Dns:
    """TXT and CAA records on the server of `config`, for names under `domain`."""

    def __init__(self, config: Rfc2136Provider, domain: str, *, timeout: float = TIMEOUT) -> None:
        config.validate()
        self.config = config
        self.host, self.port = split_server(config.server)
        self.domain = domain.strip().rstrip(".").lower().removeprefix("*.")
        self.timeout = timeout
        self._keyname = dns.name.from_text(config.tsig_key_name)
        self._keyring = {
            self._keyname: dns.tsig.Key(self._keyname, config.tsig_secret, config.tsig_algorithm)
        }
        self._zone: dns.name.Name | None = (
            dns.name.from_text(config.zone) if config.zone is not None else None
        )

    async def aclose(self) -> None:
        return None

    async def _send(self, msg: dns.message.Message, what: str) -> dns.message.Message:
        try:
            return await dns.asyncquery.tcp(msg, self.host, port=self.port, timeout=self.timeout)
        except dns.tsig.PeerError as e:
            raise DnsProviderError(f"rfc2136 {what}: the server refused the tsig key ({e})") from e
        except (dns.exception.DNSException, OSError) as e:
            raise DnsProviderError(
                f"rfc2136 {what}: server {self.host}:{self.port} failed: {type(e).__name__}"
            ) from e

    async def zone(self) -> dns.name.Name:
        """the configured zone, or the one the server is authoritative for above the domain."""
        if self._zone is not None:
            return self._zone
        q = dns.message.make_query(self.domain, dns.rdatatype.SOA)
        q.use_tsig(self._keyring, keyname=self._keyname)
        r = await self._send(q, f"soa query for {self.domain}")
        for section in (r.answer, r.authority):
            for rrset in section:
                if rrset.rdtype == dns.rdatatype.SOA:
                    self._zone = rrset.name
                    return rrset.name
        raise DnsProviderError(
            f"rfc2136: server {self.host}:{self.port} is not authoritative for {self.domain}"
            f" ({dns.rcode.to_text(r.rcode())})"
        )

    async def check(self) -> None:
        await self.zone()

    async def _update(self, build: str, name: str, rtype: str, rdata: str, ttl: int) -> None:
        zone = await self.zone()
        owner = dns.name.from_text(name)
        if not owner.is_subdomain(zone):
            raise DnsProviderError(f"rfc2136: {name} is not in zone {zone.to_text()}")
        upd = dns.update.UpdateMessage(zone, keyring=self._keyring, keyname=self._keyname)
        rd = dns.rdata.from_text(dns.rdataclass.IN, rtype, rdata)
        if build == "add":
            upd.add(owner, ttl, rd)
        else:
            upd.delete(owner, rd)
        r = await self._send(upd, f"update of {name}")
        if r.rcode() != dns.rcode.NOERROR:
            raise DnsProviderError(
                f"rfc2136 update of {name} {rtype} refused by the server:"
                f" {dns.rcode.to_text(r.rcode())}"
            )

    async def _add(self, name: str, rtype: str, rdata: str, ttl: int) -> str:
        await self._update("add", name, rtype, rdata, ttl)
        return _encode_id(name, rtype, rdata)

    async def add_txt(self, fqdn: str, value: str, ttl: int) -> str:
        rd = dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, [value.encode()])
        return await self._add(fqdn, TXT, rd.to_text(), ttl)

    async def add_caa(self, name: str, flags: int, tag: str, value: str) -> str:
        rdata = caa_content(flags, tag, value.replace("\\", "\\\\").replace('"', '\\"'))
        rd = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.CAA, rdata)
        return await self._add(name, CAA, rd.to_text(), 3600)

    async def list_records(self, fqdn: str, rtype: str) -> list[DnsRecord]:
        q = dns.message.make_query(fqdn, rtype)
        q.use_tsig(self._keyring, keyname=self._keyname)
        r = await self._send(q, f"query of {fqdn} {rtype}")
        if r.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            raise DnsProviderError(
                f"rfc2136 query of {fqdn} {rtype}: {dns.rcode.to_text(r.rcode())}"
            )
        owner = dns.name.from_text(fqdn)
        out = []
        for rrset in r.answer:
            if rrset.name == owner and dns.rdatatype.to_text(rrset.rdtype) == rtype:
                for rd in rrset:
                    out.append(
                        DnsRecord(_encode_id(fqdn, rtype, rd.to_text()), fqdn, rtype,
                                  _content(rtype, rd))
                    )  # fmt: skip
        return out

    async def delete_record(self, record_id: str) -> None:
        name, rtype, rdata = _decode_id(record_id)
        await self._update("delete", name, rtype, rdata, 0)
