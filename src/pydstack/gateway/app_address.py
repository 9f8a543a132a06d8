"""custom domains: an SNI outside every gateway base domain names its app through DNS TXT (§2.4).

The record ``<prefix>.<sni>`` (prefix ``_dstack-app-address`` by default; with
``app_address_ns_compat`` also ``_tapp-address.<sni>``, asked in parallel, the primary answer
winning) holds ``"<app_id or instance_id>:<port>"``; when neither exists,
``<prefix>-wildcard.<parent of sni>`` is asked. Such connections always go through TLS
passthrough (the app terminates TLS for its own domain).

:func:`parse_app_address` is the sans-I/O part (:class:`AppAddressError`, an
:class:`~pydstack.errors.InputError`, for a malformed value). :class:`AppAddressResolver` asks
with dnspython's async resolver (the system configuration or ``app_address_dns_servers``), each
lookup bounded by ``timeouts.dns_resolve``, and caches up to 256 answers for their TTL (at most
5 minutes) and failures for at most 10 s.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdtypes.ANY.TXT
import dns.resolver

from pydstack.errors import InputError
from pydstack.types.netaddr import parse_port

COMPAT_PREFIX = "_tapp-address"
CACHE_SIZE = 256
NEGATIVE_TTL = 10.0
MAX_TTL = 300.0
_MAX_ID = 128


class AppAddressError(InputError):
    """no usable app address record for a custom domain."""


@dataclass(frozen=True, slots=True)
class AppAddress:
    """where a custom domain points: an app or instance id and a port."""

    id: str
    port: int


def parse_app_address(value: str) -> AppAddress:
    """``"<id>:<port>"`` with an alphanumeric id and a port in 1..65535."""
    app_id, sep, port = value.strip().rpartition(":")
    if not sep or not app_id or len(app_id) > _MAX_ID or not app_id.isascii():
        raise AppAddressError("bad app address record")
    if not app_id.isalnum():
        raise AppAddressError("bad app address record")
    number = parse_port(port)
    if number is None:
        raise AppAddressError("bad port in app address record")
    return AppAddress(app_id.lower(), number)


def _nameserver(addr: str) -> dns.nameserver.Do53Nameserver:
    host, sep, port = addr.rpartition(":")
    if not sep:
        return dns.nameserver.Do53Nameserver(addr, 53)
    host = host.strip("[]")
    number = parse_port(port)
    if number is None:
        raise AppAddressError(f"bad dns server address {addr!r}")
    return dns.nameserver.Do53Nameserver(host, number)


class AppAddressResolver:
    """TXT lookups of custom domains with a small TTL cache."""

    def __init__(
        self,
        *,
        prefix: str = "_dstack-app-address",
        compat: bool = True,
        dns_servers: Sequence[str] = (),
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prefix = prefix
        self.compat = compat and prefix != COMPAT_PREFIX
        self.timeout = timeout
        self._clock = clock
        if dns_servers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [_nameserver(a) for a in dns_servers]
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.lifetime = timeout
        self._resolver.timeout = timeout
        self._cache: OrderedDict[str, tuple[float, AppAddress | None]] = OrderedDict()

    async def _txt(self, name: str) -> tuple[AppAddress | None, float]:
        """the first TXT string at `name`, parsed, and the answer's TTL; None when absent."""
        try:
            answer = await self._resolver.resolve(name, "TXT", raise_on_no_answer=False)
        except (dns.exception.DNSException, OSError):
            return None, NEGATIVE_TTL
        if answer.rrset is None:
            return None, NEGATIVE_TTL
        for rr in answer.rrset:
            if isinstance(rr, dns.rdtypes.ANY.TXT.TXT) and rr.strings:
                text = rr.strings[0].decode("ascii", "replace")
                try:
                    return parse_app_address(text), float(answer.rrset.ttl)
                except AppAddressError:
                    return None, NEGATIVE_TTL
        return None, NEGATIVE_TTL

    async def resolve(self, sni: str) -> AppAddress:
        """the app address of `sni`. AppAddressError when no record gives one in time."""
        now = self._clock()
        hit = self._cache.get(sni)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(sni)
            if hit[1] is None:
                raise AppAddressError(f"no app address for {sni}")
            return hit[1]
        try:
            found, ttl = await asyncio.wait_for(self._lookup(sni), self.timeout)
        except TimeoutError:
            found, ttl = None, NEGATIVE_TTL
        ttl = min(ttl, MAX_TTL) if found is not None else min(ttl, NEGATIVE_TTL)
        self._cache[sni] = (now + ttl, found)
        self._cache.move_to_end(sni)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        if found is None:
            raise AppAddressError(f"no app address for {sni}")
        return found

    async def _lookup(self, sni: str) -> tuple[AppAddress | None, float]:
        primary = asyncio.ensure_future(self._txt(f"{self.prefix}.{sni}"))
        compat = asyncio.ensure_future(self._txt(f"{COMPAT_PREFIX}.{sni}")) if self.compat else None
        try:
            found, ttl = await primary
            if found is not None:
                return found, ttl
            if compat is not None:
                found, ttl = await compat
                if found is not None:
                    return found, ttl
        finally:
            if compat is not None and not compat.done():
                compat.cancel()
        _, dot, parent = sni.partition(".")
        if not dot or not parent:
            return None, NEGATIVE_TTL
        return await self._txt(f"{self.prefix}-wildcard.{parent}")
