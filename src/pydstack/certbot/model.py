"""the certbot's stored records, with upstream's field names, and their JSON.

Every ``from_json`` takes a decoded JSON object and raises :class:`CertbotInputError` naming the
field for a foreign shape; ``to_json`` gives the object back. Times are unix seconds, durations
seconds. Secrets (API tokens, TSIG secrets, private keys) are only in ``to_json``; the ``info``
forms redact them (:func:`redact`).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pydstack.types.netaddr import parse_port

from .errors import CertbotInputError

LETSENCRYPT_PRODUCTION = "https://acme-v02.api.letsencrypt.org/directory"
CLOUDFLARE_API = "https://api.cloudflare.com/client/v4"
PROVIDER_CLOUDFLARE, PROVIDER_RFC2136 = "cloudflare", "rfc2136"
PROVIDERS = (PROVIDER_CLOUDFLARE, PROVIDER_RFC2136)
TSIG_ALGORITHMS = ("hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha224", "hmac-sha1")
DEFAULT_TXT_TTL = 60
DEFAULT_MAX_DNS_WAIT = 300.0
MAX_DNS_WAIT = 3600.0
MAX_TTL = 86400
MAX_NAME = 253
MAX_TEXT = 4096
MAX_PEM = 64 * 1024

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def _bad(what: str, why: str) -> CertbotInputError:
    return CertbotInputError(f"{what} {why}")


def _str(
    obj: Mapping[str, Any], key: str, *, default: str | None = None, limit: int = MAX_TEXT
) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise _bad(key, "must be a string")
    if len(value) > limit:
        raise _bad(key, f"is longer than {limit} characters")
    return value


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    return None if obj.get(key) is None else _str(obj, key)


def _num(obj: Mapping[str, Any], key: str, *, default: float | None = None) -> float:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(key, "must be a number")
    return float(value)


def _int(obj: Mapping[str, Any], key: str, *, default: int | None = None) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(key, "must be an integer")
    return value


def _opt_int(obj: Mapping[str, Any], key: str) -> int | None:
    return None if obj.get(key) is None else _int(obj, key)


def _hex(obj: Mapping[str, Any], key: str) -> bytes:
    text = _str(obj, key, limit=2 * MAX_PEM)
    try:
        return bytes.fromhex(text.removeprefix("0x"))
    except ValueError as e:
        raise _bad(key, "must be hex") from e


def normalize_domain(domain: str) -> str:
    """a ZT-domain as upstream keys it: trimmed, the trailing ``.`` and a leading ``*.`` dropped,
    lower-case, at least two labels of letters, digits and inner hyphens (1-63 characters each,
    253 in all). CertbotInputError otherwise."""
    if not isinstance(domain, str):
        raise CertbotInputError("domain must be a string")
    d = domain.strip().rstrip(".").lower().removeprefix("*.")
    if not d:
        raise CertbotInputError("domain is empty")
    if len(d) > MAX_NAME:
        raise CertbotInputError(f"domain is longer than {MAX_NAME} characters")
    labels = d.split(".")
    if len(labels) < 2:
        raise CertbotInputError(f"domain {d!r} needs at least two labels")
    for label in labels:
        if not _LABEL.match(label):
            raise CertbotInputError(f"domain {d!r} has an invalid label {label[:64]!r}")
    return d


def check_url(url: str, what: str) -> str:
    """`url` if it is http(s) with a host and no credentials; CertbotInputError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CertbotInputError(f"{what} must be an http(s) url with a host")
    if parts.username is not None or parts.password is not None:
        raise CertbotInputError(f"{what} must not carry credentials")
    return url.rstrip("/")


def redact(secret: str) -> str:
    """upstream's redaction: the first and last 4 characters around ``...``, or all ``*`` for a
    secret of 8 characters or fewer."""
    if len(secret) <= 8:
        return "*" * len(secret)
    return f"{secret[:4]}...{secret[-4:]}"


# ---------------------------------------------------------------------------- dns credentials


@dataclass(frozen=True)
class CloudflareProvider:
    """Cloudflare's v4 API with a bearer token (the zone is resolved from the domain)."""

    api_token: str
    api_url: str | None = None

    type = PROVIDER_CLOUDFLARE

    def validate(self) -> None:
        if not self.api_token or any(c.isspace() for c in self.api_token):
            raise CertbotInputError("cf_api_token must be a non-empty token without spaces")
        if self.api_url is not None:
            check_url(self.api_url, "cf_api_url")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "api_token": self.api_token}
        if self.api_url is not None:
            out["api_url"] = self.api_url
        return out

    def redacted(self) -> dict[str, Any]:
        return {"cf_api_token": redact(self.api_token), "cf_api_url": self.api_url or ""}


@dataclass(frozen=True)
class Rfc2136Provider:
    """RFC 2136 dynamic updates to an authoritative server, signed with a TSIG key.

    `server` is ``host:port`` (an IP address; port 53 when omitted); `zone` the zone to update
    (None: found by asking the server for the SOA of the name and its parents)."""

    server: str
    tsig_key_name: str
    tsig_secret: str
    tsig_algorithm: str = "hmac-sha256"
    zone: str | None = None

    type = PROVIDER_RFC2136

    def validate(self) -> None:
        host, _ = split_server(self.server)
        del host
        if not self.tsig_key_name or len(self.tsig_key_name) > MAX_NAME:
            raise CertbotInputError("tsig_key_name must be a dns name")
        if self.tsig_algorithm not in TSIG_ALGORITHMS:
            raise CertbotInputError(f"tsig_algorithm must be one of {', '.join(TSIG_ALGORITHMS)}")
        try:
            raw = base64.b64decode(self.tsig_secret, validate=True)
        except (binascii.Error, ValueError) as e:
            raise CertbotInputError("tsig_secret must be base64") from e
        if len(raw) < 16:
            raise CertbotInputError("tsig_secret must be at least 16 bytes")
        if self.zone is not None:
            normalize_domain(self.zone)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.type,
            "server": self.server,
            "tsig_key_name": self.tsig_key_name,
            "tsig_secret": self.tsig_secret,
            "tsig_algorithm": self.tsig_algorithm,
        }
        if self.zone is not None:
            out["zone"] = self.zone
        return out

    def redacted(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "tsig_key_name": self.tsig_key_name,
            "tsig_secret": redact(self.tsig_secret),
            "tsig_algorithm": self.tsig_algorithm,
            "zone": self.zone or "",
        }


DnsProviderConfig = CloudflareProvider | Rfc2136Provider


def split_server(server: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``, or a bare address with port 53) of a DNS server;
    CertbotInputError for anything else."""
    import ipaddress

    host, port = server, 53
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise CertbotInputError(f"dns server {server!r} is not host:port")
            port = _port(rest[1:], server)
    elif server.count(":") == 1:
        host, _, p = server.partition(":")
        port = _port(p, server)
    try:
        ipaddress.ip_address(host)
    except ValueError as e:
        raise CertbotInputError(f"dns server {server!r} must be an ip address") from e
    return host, port


def _port(text: str, server: str) -> int:
    port = parse_port(text)
    if port is None:
        raise CertbotInputError(f"dns server {server!r} has an invalid port")
    return port


def provider_from_json(obj: Any) -> DnsProviderConfig:
    if not isinstance(obj, Mapping):
        raise CertbotInputError("provider must be an object")
    kind = obj.get("type")
    if kind == PROVIDER_CLOUDFLARE:
        return CloudflareProvider(_str(obj, "api_token"), _opt_str(obj, "api_url"))
    if kind == PROVIDER_RFC2136:
        return Rfc2136Provider(
            server=_str(obj, "server"),
            tsig_key_name=_str(obj, "tsig_key_name"),
            tsig_secret=_str(obj, "tsig_secret"),
            tsig_algorithm=_str(obj, "tsig_algorithm", default="hmac-sha256"),
            zone=_opt_str(obj, "zone"),
        )
    raise CertbotInputError(f"unknown dns provider type {str(kind)[:32]!r}")


@dataclass(frozen=True)
class DnsCredential:
    """upstream's ``dns_cred/<id>``: a named provider with its TXT TTL and propagation wait."""

    id: str
    name: str
    provider: DnsProviderConfig
    max_dns_wait: float = DEFAULT_MAX_DNS_WAIT
    dns_txt_ttl: int = DEFAULT_TXT_TTL
    created_at: float = 0.0
    updated_at: float = 0.0

    def validate(self) -> None:
        """CertbotInputError for an empty name, a bad provider or out-of-range TTL/wait."""
        if not self.name.strip() or len(self.name) > 256:
            raise CertbotInputError("dns credential name must be 1-256 characters")
        self.provider.validate()
        if not 1 <= self.dns_txt_ttl <= MAX_TTL:
            raise CertbotInputError(f"dns_txt_ttl must be between 1 and {MAX_TTL}")
        if not 0 <= self.max_dns_wait <= MAX_DNS_WAIT:
            raise CertbotInputError(f"max_dns_wait must be between 0 and {MAX_DNS_WAIT:.0f}")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "provider": self.provider.to_json(),
            "max_dns_wait": self.max_dns_wait,
            "dns_txt_ttl": self.dns_txt_ttl,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> DnsCredential:
        return cls(
            id=_str(obj, "id"),
            name=_str(obj, "name"),
            provider=provider_from_json(obj.get("provider")),
            max_dns_wait=_num(obj, "max_dns_wait", default=DEFAULT_MAX_DNS_WAIT),
            dns_txt_ttl=_int(obj, "dns_txt_ttl", default=DEFAULT_TXT_TTL),
            created_at=_num(obj, "created_at", default=0),
            updated_at=_num(obj, "updated_at", default=0),
        )

    def info(self) -> dict[str, Any]:
        """upstream's ``DnsCredentialInfo``, secrets redacted."""
        return {
            "id": self.id,
            "name": self.name,
            "provider_type": self.provider.type,
            **self.provider.redacted(),
            "dns_txt_ttl": self.dns_txt_ttl,
            "max_dns_wait": self.max_dns_wait,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


# ---------------------------------------------------------------------------- domains, settings


@dataclass(frozen=True)
class ZtDomainConfig:
    """upstream's ``cert/<domain>/config``: a base domain served under ``*.<domain>``."""

    domain: str
    dns_cred_id: str | None = None
    port: int = 443
    node: int | None = None
    priority: int = 0

    def validate(self) -> ZtDomainConfig:
        """the config with its domain normalised; CertbotInputError for a bad domain or port."""
        if not 0 < self.port < 65536:
            raise CertbotInputError("port must be between 1 and 65535")
        if self.node is not None and not 0 <= self.node < 1 << 32:
            raise CertbotInputError("node must be a u32")
        if not -(1 << 31) <= self.priority < 1 << 31:
            raise CertbotInputError("priority must be an i32")
        return ZtDomainConfig(
            normalize_domain(self.domain), self.dns_cred_id or None, self.port, self.node,
            self.priority,
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "dns_cred_id": self.dns_cred_id,
            "port": self.port,
            "node": self.node,
            "priority": self.priority,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ZtDomainConfig:
        return cls(
            domain=_str(obj, "domain", limit=MAX_NAME),
            dns_cred_id=_opt_str(obj, "dns_cred_id"),
            port=_int(obj, "port", default=443),
            node=_opt_int(obj, "node"),
            priority=_int(obj, "priority", default=0),
        )


def best_zt_domain(configs: list[ZtDomainConfig], node_id: int) -> ZtDomainConfig | None:
    """upstream's choice for Info and RegisterCvm: configs for any node or this one; the highest
    priority; on a tie a global one (no node) before a node-bound one, then by name."""
    candidates = [c for c in configs if c.node is None or c.node == node_id]
    if not candidates:
        return None
    return min(candidates, key=lambda c: (-c.priority, c.node is not None, c.domain))


@dataclass(frozen=True)
class CertbotSettings:
    """upstream's ``global/certbot_config``, and the CA named in CAA records.

    `acme_url` empty means Let's Encrypt production; `renew_interval` 0 means a check every
    minute."""

    renew_interval: float = 12 * 3600.0
    renew_before_expiration: float = 30 * 86400.0
    renew_timeout: float = 300.0
    acme_url: str = ""
    caa_issuer: str = "letsencrypt.org"

    @property
    def directory_url(self) -> str:
        return self.acme_url or LETSENCRYPT_PRODUCTION

    def validate(self) -> None:
        if not 0 <= self.renew_interval <= 30 * 86400:
            raise CertbotInputError("renew_interval must be between 0 and 30 days")
        if not 0 <= self.renew_before_expiration <= 3650 * 86400:
            raise CertbotInputError("renew_before_expiration must be between 0 and 3650 days")
        if not 1 <= self.renew_timeout <= 86400:
            raise CertbotInputError("renew_timeout must be between 1 and 86400 seconds")
        if self.acme_url:
            check_url(self.acme_url, "acme_url")
        if not re.fullmatch(r"[a-z0-9.-]{1,253}", self.caa_issuer):
            raise CertbotInputError("caa_issuer must be a ca's domain name")

    def to_json(self) -> dict[str, Any]:
        return {
            "renew_interval": self.renew_interval,
            "renew_before_expiration": self.renew_before_expiration,
            "renew_timeout": self.renew_timeout,
            "acme_url": self.acme_url,
            "caa_issuer": self.caa_issuer,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CertbotSettings:
        base = cls()
        return cls(
            renew_interval=_num(obj, "renew_interval", default=base.renew_interval),
            renew_before_expiration=_num(
                obj, "renew_before_expiration", default=base.renew_before_expiration
            ),
            renew_timeout=_num(obj, "renew_timeout", default=base.renew_timeout),
            acme_url=_str(obj, "acme_url", default=""),
            caa_issuer=_str(obj, "caa_issuer", default=base.caa_issuer),
        )


# ---------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class CertData:
    """upstream's ``cert/<domain>/data``: the chain (leaf first) and its key, as PEM."""

    cert_pem: str
    key_pem: str = field(repr=False)
    not_after: float
    issued_by: int
    issued_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "cert_pem": self.cert_pem,
            "key_pem": self.key_pem,
            "not_after": self.not_after,
            "issued_by": self.issued_by,
            "issued_at": self.issued_at,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CertData:
        return cls(
            cert_pem=_str(obj, "cert_pem", limit=MAX_PEM),
            key_pem=_str(obj, "key_pem", limit=MAX_PEM),
            not_after=_num(obj, "not_after"),
            issued_by=_int(obj, "issued_by"),
            issued_at=_num(obj, "issued_at"),
        )


@dataclass(frozen=True)
class CertAttestation:
    """upstream's ``cert/<domain>/attestation/<ts>``: an issued key (SPKI DER) and the evidence
    binding it (`quote`: the guest agent's GetQuote answer as JSON text; `attestation`: the
    Attest answer's versioned attestation, hex)."""

    public_key: bytes
    quote: str
    attestation: str
    generated_by: int
    generated_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "public_key": self.public_key.hex(),
            "quote": self.quote,
            "attestation": self.attestation,
            "generated_by": self.generated_by,
            "generated_at": self.generated_at,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> CertAttestation:
        return cls(
            public_key=_hex(obj, "public_key"),
            quote=_str(obj, "quote", limit=1 << 24),
            attestation=_str(obj, "attestation", limit=1 << 25),
            generated_by=_int(obj, "generated_by"),
            generated_at=_num(obj, "generated_at"),
        )


@dataclass(frozen=True)
class AcmeAttestation:
    """upstream's ``global/acme_attestation``: the account URI and the evidence binding it."""

    account_uri: str
    quote: str
    attestation: str
    generated_by: int
    generated_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "account_uri": self.account_uri,
            "quote": self.quote,
            "attestation": self.attestation,
            "generated_by": self.generated_by,
            "generated_at": self.generated_at,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> AcmeAttestation:
        return cls(
            account_uri=_str(obj, "account_uri"),
            quote=_str(obj, "quote", limit=1 << 24),
            attestation=_str(obj, "attestation", limit=1 << 25),
            generated_by=_int(obj, "generated_by"),
            generated_at=_num(obj, "generated_at"),
        )


@dataclass(frozen=True)
class AcmeCredentials:
    """the shared ACME account in upstream's JSON: ``{"account_id", "acme_url", "credentials":
    {"id", "key_pkcs8" (base64url PKCS#8 DER), "directory"}}`` (instant-acme's shape)."""

    account_id: str
    acme_url: str
    key_pkcs8: bytes = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        key = base64.urlsafe_b64encode(self.key_pkcs8).rstrip(b"=").decode()
        return {
            "account_id": self.account_id,
            "acme_url": self.acme_url,
            "credentials": {"id": self.account_id, "key_pkcs8": key, "directory": self.acme_url},
        }

    @classmethod
    def from_json(cls, obj: Any) -> AcmeCredentials:
        """CertbotInputError ("corrupt acme credentials: ...") for any other shape."""
        try:
            if not isinstance(obj, Mapping):
                raise _bad("acme credentials", "must be an object")
            creds = obj.get("credentials")
            if not isinstance(creds, Mapping):
                raise _bad("credentials", "must be an object")
            key = _str(creds, "key_pkcs8")
            try:
                raw = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))
            except (binascii.Error, ValueError) as e:
                raise _bad("key_pkcs8", "must be base64url") from e
            account_id = _str(obj, "account_id", default=creds.get("id"))
            acme_url = _str(obj, "acme_url", default=creds.get("directory"))
            check_url(account_id, "account_id")
            check_url(acme_url, "acme_url")
        except CertbotInputError as e:
            raise CertbotInputError(f"corrupt acme credentials: {e}") from e
        return cls(account_id, acme_url, raw)
