"""the certificates the gateway terminates TLS with: one wildcard ``*.<base_domain>`` per base
domain, matched exactly one label deep (``a.example.com`` matches ``example.com``'s;
``a.b.example.com`` does not).

A base domain with a certificate is a gateway domain: its SNIs follow the ingress grammar; every
other SNI is a custom domain (TXT lookup, passthrough). The store builds two server
:class:`ssl.SSLContext` per domain, one without ALPN (terminate) and one offering ``h2``, with the
configured TLS versions. :meth:`CertStore.set` refuses (keeping what was there) a chain or key that
does not load, a key that does not match, or a certificate already expired
(:class:`CertStoreError`, an :class:`~pydstack.errors.InputError`); one bad domain never affects
another. Keys are loaded from an anonymous memory file, never written to disk.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pydstack.crypto.certload import load_cert_pem
from pydstack.errors import InputError

from .tickets import set_ticket_keys

TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class CertStoreError(InputError):
    """a certificate or key cannot be used."""


@dataclass(frozen=True, slots=True)
class DomainCert:
    """one base domain's certificate, its PEMs (for copying to workers) and contexts."""

    domain: str
    chain_pem: str
    key_pem: str
    not_after: float
    plain: ssl.SSLContext
    h2: ssl.SSLContext


def tls_version_range(versions: Iterable[str]) -> tuple[ssl.TLSVersion, ssl.TLSVersion]:
    """the (minimum, maximum) of `tls_versions` (["1.2"], ["1.3"] or both). CertStoreError for an
    unknown version or an empty list."""
    vs = [TLS_VERSIONS.get(v) for v in versions]
    if not vs or any(v is None for v in vs):
        raise CertStoreError('tls_versions must list "1.2" and/or "1.3"')
    known = [v for v in vs if v is not None]
    return min(known), max(known)


def server_context(
    chain_pem: str,
    key_pem: str,
    versions: tuple[ssl.TLSVersion, ssl.TLSVersion],
    alpn: list[str] | None = None,
    ticket_keys: bytes | None = None,
) -> ssl.SSLContext:
    """a server context for a PEM chain and key (and session-ticket keys shared by the worker
    processes, when given). CertStoreError when they do not load."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version, ctx.maximum_version = versions
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    if alpn:
        ctx.set_alpn_protocols(alpn)
    fd = os.memfd_create("gateway-cert", os.MFD_CLOEXEC)
    try:
        os.write(fd, (chain_pem.rstrip() + "\n" + key_pem.rstrip() + "\n").encode())
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    except (ssl.SSLError, OSError, UnicodeEncodeError) as e:
        why = getattr(e, "reason", None) or type(e).__name__
        raise CertStoreError(f"certificate or key does not load: {why}") from None
    finally:
        os.close(fd)
    if ticket_keys is not None:
        set_ticket_keys(ctx, ticket_keys)
    return ctx


class CertStore:
    """base domain → certificate; lookups never lock (the map is replaced, not mutated)."""

    def __init__(
        self,
        tls_versions: Iterable[str] = ("1.2",),
        *,
        clock: Callable[[], float] | None = None,
        ticket_keys: bytes | None = None,
    ) -> None:
        self.versions = tls_version_range(tls_versions)
        self.ticket_keys = ticket_keys
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC).timestamp())
        self._certs: dict[str, DomainCert] = {}
        self.version = 0

    def set(self, domain: str, chain_pem: str, key_pem: str) -> DomainCert:
        """load `*.domain`'s certificate (the chain's first one is the leaf)."""
        domain = normalize_domain(domain)
        try:
            leaf = load_cert_pem(chain_pem)
        except (ValueError, UnicodeEncodeError) as e:
            raise CertStoreError(f"certificate for {domain} is not pem") from e
        not_after = leaf.not_valid_after_utc.timestamp()
        if not_after <= self._clock():
            raise CertStoreError(f"certificate for {domain} has expired")
        plain = server_context(chain_pem, key_pem, self.versions, None, self.ticket_keys)
        h2 = server_context(chain_pem, key_pem, self.versions, ["h2"], self.ticket_keys)
        entry = DomainCert(domain, chain_pem, key_pem, not_after, plain, h2)
        certs = dict(self._certs)
        certs[domain] = entry
        self._certs = certs
        self.version += 1
        return entry

    def remove(self, domain: str) -> None:
        certs = dict(self._certs)
        if certs.pop(normalize_domain(domain), None) is not None:
            self._certs = certs
            self.version += 1

    def domains(self) -> list[str]:
        return sorted(self._certs)

    def get(self, domain: str) -> DomainCert | None:
        return self._certs.get(domain)

    def for_sni(self, sni: str) -> DomainCert | None:
        """the wildcard certificate covering `sni` (its parent domain's), or None."""
        _, dot, parent = sni.partition(".")
        return self._certs.get(parent) if dot else None

    def entries(self) -> list[tuple[str, str, str]]:
        """(domain, chain_pem, key_pem) of every certificate, for a worker snapshot."""
        return [(c.domain, c.chain_pem, c.key_pem) for c in self._certs.values()]


def normalize_domain(domain: str) -> str:
    """lower-case, without a leading ``*.`` or a trailing dot; CertStoreError when empty."""
    d = domain.strip().lower().rstrip(".")
    if d.startswith("*."):
        d = d[2:]
    if not d or " " in d:
        raise CertStoreError("bad base domain")
    return d
