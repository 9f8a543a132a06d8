"""the DNS-01 self-check: wait until resolvers serve the challenge TXT values.

Upstream's backoff: 250 ms, doubling up to 32 s, until every expected value is seen at its name
or `max_wait` has passed — then the order goes on anyway (the CA may still see them). Queries go
to the system resolver, or to the given ``host:port`` servers (e.g. the zone's authoritative
server). Lookup failures count as "not yet".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.rdtypes.ANY.TXT

from .model import split_server

log = logging.getLogger(__name__)

FIRST_DELAY, MAX_DELAY = 0.25, 32.0


def make_resolver(servers: Sequence[str] = ()) -> dns.asyncresolver.Resolver:
    """the system resolver, or one asking `servers` (``host:port``) only."""
    if not servers:
        return dns.asyncresolver.Resolver()
    r = dns.asyncresolver.Resolver(configure=False)
    hosts = [split_server(s) for s in servers]
    r.nameservers = [h for h, _ in hosts]
    r.nameserver_ports = {h: p for h, p in hosts}
    r.timeout, r.lifetime = 2.0, 5.0
    return r


async def txt_values(resolver: dns.asyncresolver.Resolver, fqdn: str) -> set[str]:
    """the TXT values at `fqdn`, empty when there are none or the lookup failed."""
    try:
        answer = await resolver.resolve(fqdn, dns.rdatatype.TXT, raise_on_no_answer=False)
    except dns.exception.DNSException:
        return set()
    out = set()
    for rd in answer.rrset or ():
        if isinstance(rd, dns.rdtypes.ANY.TXT.TXT):
            out.add(b"".join(rd.strings).decode("utf-8", "replace"))
    return out


async def wait_for_txt(
    expected: Mapping[str, set[str]],
    max_wait: float,
    *,
    resolver: dns.asyncresolver.Resolver | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """True once every name in `expected` serves all its values; False when `max_wait` ran out
    first (the caller proceeds: the check is advisory)."""
    res = resolver or make_resolver()
    deadline = clock() + max_wait
    delay = FIRST_DELAY
    while True:
        missing = []
        for name, values in expected.items():
            if not values <= await txt_values(res, name):
                missing.append(name)
        if not missing:
            return True
        left = deadline - clock()
        if left <= 0:
            log.warning("dns-01 records not seen at %s after %.0f s", ", ".join(missing), max_wait)
            return False
        await sleep(min(delay, left))
        delay = min(delay * 2, MAX_DELAY)
