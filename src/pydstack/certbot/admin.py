"""the Admin API's certificate operations (gateway notes §1.5), for the gateway's RPC to wrap.

Answers are JSON objects with upstream's field names (``DnsCredentialInfo``, ``ZtDomainInfo``,
``CertAttestationInfo``, the certbot config in ``*_secs``). Secrets never leave: credentials are
shown redacted (:func:`~.model.redact`). Bad input is a :class:`CertbotInputError` and changes
nothing; a missing credential or domain is a :class:`~pydstack.errors.NotFoundError`.

* DNS credentials: ``cloudflare`` (``cf_api_token``, optional ``cf_api_url``; ``cf_zone_id`` is
  ignored, the zone is resolved) or ``rfc2136`` (``server``, ``tsig_key_name``, ``tsig_secret``,
  ``tsig_algorithm``, optional ``zone``); ids are ``hex(unix ms)`` and 8 random hex digits; TTL
  60 s and wait 300 s by default; the default credential and any a ZT-domain names cannot be
  deleted.
* ZT-domains: the domain normalised, port 1-65535, a named credential must exist; add refuses
  an existing domain, update a missing one; delete drops the config only.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable
from typing import Any

from pydstack.errors import NotFoundError

from .certbot import Certbot, Outcome
from .errors import CertbotInputError
from .model import (
    DEFAULT_MAX_DNS_WAIT,
    DEFAULT_TXT_TTL,
    PROVIDER_CLOUDFLARE,
    PROVIDER_RFC2136,
    CertbotSettings,
    CloudflareProvider,
    DnsCredential,
    DnsProviderConfig,
    Rfc2136Provider,
    ZtDomainConfig,
    normalize_domain,
)
from .storage import CertStorage

MAX_ATTESTATIONS = 1000


def new_credential_id(now: float) -> str:
    return f"{int(now * 1000):x}{secrets.token_hex(4)}"


class CertbotAdmin:
    """the operations, on `storage` and `certbot`; `loaded(domain)` says whether the gateway
    serves a certificate for it (``cert_status.loaded_in_memory``)."""

    def __init__(
        self,
        storage: CertStorage,
        certbot: Certbot,
        *,
        loaded: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.storage = storage
        self.certbot = certbot
        self.loaded = loaded or (lambda _: False)
        self.clock = clock

    # ------------------------------------------------------------------------- dns credentials

    async def _cred(self, cred_id: str) -> DnsCredential:
        cred = await self.storage.get_dns_credential(cred_id)
        if cred is None:
            raise NotFoundError(f"dns credential {cred_id} does not exist")
        return cred

    async def list_dns_credentials(self) -> list[dict[str, Any]]:
        return [c.info() for c in await self.storage.list_dns_credentials()]

    async def get_dns_credential(self, cred_id: str) -> dict[str, Any]:
        return (await self._cred(cred_id)).info()

    async def create_dns_credential(
        self,
        name: str,
        provider_type: str,
        *,
        set_as_default: bool = False,
        dns_txt_ttl: int | None = None,
        max_dns_wait: float | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """a new credential (`fields`: the provider's, see the module doc); its info."""
        provider = _provider(provider_type, fields)
        now = self.clock()
        cred = DnsCredential(
            id=new_credential_id(now),
            name=name,
            provider=provider,
            max_dns_wait=DEFAULT_MAX_DNS_WAIT if max_dns_wait is None else float(max_dns_wait),
            dns_txt_ttl=DEFAULT_TXT_TTL if dns_txt_ttl is None else int(dns_txt_ttl),
            created_at=now,
            updated_at=now,
        )
        cred.validate()
        await self.storage.put_dns_credential(cred)
        if set_as_default:
            await self.storage.set_default_dns_credential(cred.id)
        return cred.info()

    async def update_dns_credential(
        self, cred_id: str, *, name: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        """changes the name and provider fields given (not the type, TTL or wait)."""
        cred = await self._cred(cred_id)
        given = {k: v for k, v in fields.items() if v is not None}
        given.pop("cf_zone_id", None)
        provider: DnsProviderConfig
        if isinstance(cred.provider, CloudflareProvider):
            unknown = set(given) - {"cf_api_token", "cf_api_url"}
            provider = dataclasses.replace(
                cred.provider,
                api_token=given.get("cf_api_token", cred.provider.api_token),
                api_url=given.get("cf_api_url", cred.provider.api_url) or None,
            )
        else:
            keys = {"server", "tsig_key_name", "tsig_secret", "tsig_algorithm", "zone"}
            unknown = set(given) - keys
            provider = dataclasses.replace(
                cred.provider, **{k: given[k] for k in keys & set(given)}
            )
        if unknown:
            raise CertbotInputError(f"{cred.provider.type} credentials have no {sorted(unknown)}")
        new = dataclasses.replace(
            cred,
            name=cred.name if name is None else name,
            provider=provider,
            updated_at=self.clock(),
        )
        new.validate()
        await self.storage.put_dns_credential(new)
        return new.info()

    async def delete_dns_credential(self, cred_id: str) -> None:
        await self._cred(cred_id)
        if await self.storage.get_default_dns_credential() == cred_id:
            raise CertbotInputError(f"dns credential {cred_id} is the default")
        users = [z.domain for z in await self.storage.list_zt_domains() if z.dns_cred_id == cred_id]
        if users:
            raise CertbotInputError(f"dns credential {cred_id} is used by {', '.join(users)}")
        await self.storage.delete_dns_credential(cred_id)

    async def get_default_dns_credential(self) -> dict[str, Any] | None:
        cred_id = await self.storage.get_default_dns_credential()
        if cred_id is None:
            return None
        cred = await self.storage.get_dns_credential(cred_id)
        return cred.info() if cred is not None else None

    async def set_default_dns_credential(self, cred_id: str) -> None:
        await self._cred(cred_id)
        await self.storage.set_default_dns_credential(cred_id)

    # ------------------------------------------------------------------------- zt-domains

    async def _domain_info(self, config: ZtDomainConfig) -> dict[str, Any]:
        data = await self.storage.get_cert(config.domain)
        status: dict[str, Any] = {
            "has_cert": data is not None,
            "not_after": int(data.not_after) if data else 0,
            "issued_by": data.issued_by if data else 0,
            "issued_at": int(data.issued_at) if data else 0,
            "loaded_in_memory": self.loaded(config.domain),
        }
        return {"config": config.to_json(), "cert_status": status}

    async def _domain(self, domain: str) -> ZtDomainConfig:
        config = await self.storage.get_zt_domain(normalize_domain(domain))
        if config is None:
            raise NotFoundError(f"zt-domain {normalize_domain(domain)} does not exist")
        return config

    async def list_zt_domains(self) -> list[dict[str, Any]]:
        return [await self._domain_info(c) for c in await self.storage.list_zt_domains()]

    async def get_zt_domain(self, domain: str) -> dict[str, Any]:
        return await self._domain_info(await self._domain(domain))

    async def _checked(self, config: ZtDomainConfig) -> ZtDomainConfig:
        config = config.validate()
        if config.dns_cred_id is not None:
            await self._cred(config.dns_cred_id)
        return config

    async def add_zt_domain(self, config: ZtDomainConfig) -> dict[str, Any]:
        config = await self._checked(config)
        if await self.storage.get_zt_domain(config.domain) is not None:
            raise CertbotInputError(f"zt-domain {config.domain} already exists")
        await self.storage.put_zt_domain(config)
        return await self._domain_info(config)

    async def update_zt_domain(self, config: ZtDomainConfig) -> dict[str, Any]:
        config = await self._checked(config)
        await self._domain(config.domain)
        await self.storage.put_zt_domain(config)
        return await self._domain_info(config)

    async def delete_zt_domain(self, domain: str) -> None:
        config = await self._domain(domain)
        await self.storage.delete_zt_domain(config.domain)

    async def renew_zt_domain_cert(self, domain: str, *, force: bool = False) -> dict[str, Any]:
        config = await self._domain(domain)
        outcome = await self.certbot.renew(config.domain, force=force)
        data = await self.storage.get_cert(config.domain)
        return {
            "renewed": outcome is Outcome.RENEWED,
            "not_after": int(data.not_after) if data else 0,
        }

    async def force_release_cert_lock(self, domain: str) -> bool:
        config = await self._domain(domain)
        return await self.certbot.lock.force_release(f"cert/{config.domain}/lock")

    async def list_cert_attestations(self, domain: str, limit: int = 0) -> dict[str, Any]:
        """``{latest, history}`` (history newest first, at most `limit`; 0: up to 1000)."""
        d = normalize_domain(domain)
        n = MAX_ATTESTATIONS if limit <= 0 else min(limit, MAX_ATTESTATIONS)
        hist = await self.storage.list_cert_attestations(d, n)

        def info(a: Any) -> dict[str, Any]:
            return {
                "public_key": a.public_key.hex(),
                "quote": a.quote,
                "generated_by": a.generated_by,
                "generated_at": int(a.generated_at),
            }

        return {"latest": info(hist[0]) if hist else None, "history": [info(a) for a in hist]}

    # ------------------------------------------------------------------------- settings

    async def get_certbot_config(self) -> dict[str, Any]:
        s = await self.storage.get_settings()
        return {
            "renew_interval_secs": int(s.renew_interval),
            "renew_before_expiration_secs": int(s.renew_before_expiration),
            "renew_timeout_secs": int(s.renew_timeout),
            "acme_url": s.acme_url,
        }

    async def set_certbot_config(
        self,
        *,
        renew_interval_secs: int | None = None,
        renew_before_expiration_secs: int | None = None,
        renew_timeout_secs: int | None = None,
        acme_url: str | None = None,
        caa_issuer: str | None = None,
    ) -> dict[str, Any]:
        """changes the fields given (cluster-wide)."""
        cur = await self.storage.get_settings()
        new = CertbotSettings(
            renew_interval=cur.renew_interval
            if renew_interval_secs is None
            else float(renew_interval_secs),
            renew_before_expiration=cur.renew_before_expiration
            if renew_before_expiration_secs is None
            else float(renew_before_expiration_secs),
            renew_timeout=cur.renew_timeout
            if renew_timeout_secs is None
            else float(renew_timeout_secs),
            acme_url=cur.acme_url if acme_url is None else acme_url.strip(),
            caa_issuer=cur.caa_issuer if caa_issuer is None else caa_issuer.strip(),
        )
        new.validate()
        await self.storage.put_settings(new)
        return await self.get_certbot_config()

    async def rotate_acme_credentials(self) -> dict[str, Any]:
        result = await self.certbot.rotate_acme_credentials()
        return {
            "account_uri": result.account_uri,
            "domains_updated": result.domains_updated,
            "domains_failed": result.failed,
        }


def _provider(provider_type: str, fields: dict[str, Any]) -> DnsProviderConfig:
    given = {k: v for k, v in fields.items() if v is not None}
    given.pop("cf_zone_id", None)
    if provider_type == PROVIDER_CLOUDFLARE:
        unknown = set(given) - {"cf_api_token", "cf_api_url"}
        if unknown:
            raise CertbotInputError(f"cloudflare credentials have no {sorted(unknown)}")
        return CloudflareProvider(
            str(given.get("cf_api_token", "")),
            str(given["cf_api_url"]) if given.get("cf_api_url") else None,
        )
    if provider_type == PROVIDER_RFC2136:
        keys = {"server", "tsig_key_name", "tsig_secret", "tsig_algorithm", "zone"}
        unknown = set(given) - keys
        if unknown:
            raise CertbotInputError(f"rfc2136 credentials have no {sorted(unknown)}")
        missing = {"server", "tsig_key_name", "tsig_secret"} - set(given)
        if missing:
            raise CertbotInputError(f"rfc2136 credentials need {sorted(missing)}")
        return Rfc2136Provider(
            server=str(given["server"]),
            tsig_key_name=str(given["tsig_key_name"]),
            tsig_secret=str(given["tsig_secret"]),
            tsig_algorithm=str(given.get("tsig_algorithm", "hmac-sha256")),
            zone=str(given["zone"]) if given.get("zone") else None,
        )
    raise CertbotInputError(
        f"provider_type must be cloudflare or rfc2136, not {provider_type[:32]!r}"
    )
