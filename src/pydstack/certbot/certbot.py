"""the distributed certbot (gateway notes §5.5): every node runs it, one renews each domain.

:meth:`Certbot.renew` renews a ZT-domain's ``*.<domain>`` certificate when it has none, when it
expires within ``renew_before_expiration``, or when forced — under the domain's
:class:`~.lock.DomainLock` (``cert/<domain>/lock``; held elsewhere: skipped). Under the lock it
looks again (another node may just have renewed), then orders with the shared account:

* ACME server unreachable (:class:`AcmeUnavailableError`): retried with exponential backoff
  (:class:`RetryPolicy`), the lock refreshed before each attempt; after the last one the error
  is raised and the stored certificate is left as it was;
* refused order or DNS provider error: raised at once, nothing stored (the DNS-01 flow removed
  its records);
* issued: stored, handed to `on_cert` (the gateway's hot reload), then attested — report data
  ``sha512("zt-cert:" || SPKI)`` — into the history; an attestation failure is logged and does
  not undo the certificate.

The shared account (``global/acme_credentials``) is made on first use under the rotation lock
and attested (``acme-account``). Stored credentials of another directory are refused ("call
RotateAcmeCredentials"); corrupt ones too. :meth:`rotate_acme_credentials` makes a new account
once every domain's DNS credential works, publishes it, re-pins CAA and attests it.

:meth:`run` checks every domain at start and every ``renew_interval`` (0: every minute);
:meth:`init_all` is the startup pass (use a valid stored certificate, else renew; locked
elsewhere: wait for the holder, then use what it stored).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .acme_client import AcmeAccount, AcmeOptions, IssuedCert, set_caa_records
from .attest import Attester, account_report_data, cert_report_data
from .dns01 import DnsProvider, make_provider
from .errors import AcmeUnavailableError, CertbotError, CertbotInputError
from .lock import DEFAULT_LOCK_TTL, DomainLock
from .model import (
    AcmeAttestation,
    AcmeCredentials,
    CertAttestation,
    CertbotSettings,
    CertData,
    DnsCredential,
    DnsProviderConfig,
    ZtDomainConfig,
    normalize_domain,
)
from .storage import CertStorage

log = logging.getLogger(__name__)

ROTATION_LOCK = "global/acme_rotation_lock"
IDLE_INTERVAL = 60.0
INIT_WAIT = 30.0


def cert_lock(domain: str) -> str:
    return f"cert/{domain}/lock"


class Outcome(enum.Enum):
    RENEWED = "renewed"
    FRESH = "fresh"  # valid and not due
    LOCKED = "locked"  # another node holds the lock


@dataclass(frozen=True)
class RetryPolicy:
    """tries of an order while the ACME server is unavailable, and the waits between them."""

    attempts: int = 5
    first_delay: float = 2.0
    max_delay: float = 60.0


@dataclass(frozen=True)
class RotationResult:
    account_uri: str
    domains_updated: list[str]
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class QuotedPublicKey:
    public_key: bytes
    quote: str
    attestation: str


@dataclass(frozen=True)
class AcmeInfo:
    """upstream's ``AcmeInfoResponse``: the account and every attested key."""

    account_uri: str
    quoted_hist_keys: list[QuotedPublicKey]
    account_quote: str
    account_attestation: str

    def to_json_obj(self, *, hex_prefix: str = "") -> dict[str, Any]:
        """the JSON of ``/.dstack/acme-info`` (bytes as hex, with `hex_prefix`)."""
        return {
            "account_uri": self.account_uri,
            "quoted_hist_keys": [
                {
                    "public_key": hex_prefix + k.public_key.hex(),
                    "quote": k.quote,
                    "attestation": k.attestation,
                }
                for k in self.quoted_hist_keys
            ],
            "account_quote": self.account_quote,
            "account_attestation": self.account_attestation,
        }


class AcmeBackend(Protocol):
    """the ACME operations the certbot makes (the ``acme`` library, or a test's stand-in)."""

    async def create_account(self, directory_url: str) -> AcmeCredentials: ...

    async def issue(
        self,
        creds: AcmeCredentials,
        domain: str,
        provider: DnsProvider,
        *,
        txt_ttl: int,
        max_dns_wait: float,
        timeout: float,
    ) -> IssuedCert: ...

    async def set_caa(
        self, creds: AcmeCredentials, provider: DnsProvider, domain: str, issuer: str
    ) -> None: ...


class LibAcmeBackend:
    """:class:`AcmeBackend` on :class:`~.acme_client.AcmeAccount`."""

    def __init__(self, options: AcmeOptions | None = None) -> None:
        self.options = options or AcmeOptions()

    async def create_account(self, directory_url: str) -> AcmeCredentials:
        return (await AcmeAccount.create(directory_url, self.options)).credentials

    async def issue(
        self,
        creds: AcmeCredentials,
        domain: str,
        provider: DnsProvider,
        *,
        txt_ttl: int,
        max_dns_wait: float,
        timeout: float,
    ) -> IssuedCert:
        account = AcmeAccount(creds, self.options)
        return await account.issue(
            domain, provider, txt_ttl=txt_ttl, max_dns_wait=max_dns_wait, timeout=timeout
        )

    async def set_caa(
        self, creds: AcmeCredentials, provider: DnsProvider, domain: str, issuer: str
    ) -> None:
        await set_caa_records(provider, domain, issuer, creds.account_id)


CertHook = Callable[[str, CertData], Awaitable[None]]
ProviderFactory = Callable[[DnsProviderConfig, str], DnsProvider]


class Certbot:
    """renewal, account and attestation for the ZT-domains in `storage`, as node `node_id`."""

    def __init__(
        self,
        storage: CertStorage,
        lock: DomainLock,
        *,
        node_id: int,
        attester: Attester | None = None,
        backend: AcmeBackend | None = None,
        on_cert: CertHook | None = None,
        providers: ProviderFactory = make_provider,
        retry: RetryPolicy | None = None,
        lock_ttl: float = DEFAULT_LOCK_TTL,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.storage = storage
        self.lock = lock
        self.node_id = node_id
        self.holder = f"node-{node_id}"
        self.attester = attester
        self.backend: AcmeBackend = backend or LibAcmeBackend()
        self.on_cert = on_cert
        self.providers = providers
        self.retry = retry or RetryPolicy()
        self.lock_ttl = lock_ttl
        self.clock = clock
        self.sleep = sleep

    # ------------------------------------------------------------------------- the account

    async def account(self, settings: CertbotSettings | None = None) -> AcmeCredentials:
        """the shared account, made (and attested) when there is none; CertbotInputError for
        corrupt credentials or ones of another directory, CertbotError while another node is
        making it."""
        settings = settings or await self.storage.get_settings()
        url = settings.directory_url
        creds = await self.storage.get_acme_credentials()
        if creds is None:
            token = await self.lock.acquire(ROTATION_LOCK, self.holder, self.lock_ttl)
            if token is None:
                raise CertbotError("another node is creating the acme account")
            try:
                creds = await self.storage.get_acme_credentials()
                if creds is None:
                    creds = await self.backend.create_account(url)
                    await self.storage.put_acme_credentials(creds)
                    await self.attest_account(creds)
            finally:
                await self.lock.release(ROTATION_LOCK, token)
        if creds.acme_url.rstrip("/") != url.rstrip("/"):
            raise CertbotInputError(
                f"the stored acme account is for {creds.acme_url}, not {url}:"
                " call RotateAcmeCredentials"
            )
        return creds

    async def attest_account(self, creds: AcmeCredentials) -> None:
        """stores the account's attestation; a failure is logged."""
        if self.attester is None:
            return
        try:
            quoted = await self.attester(account_report_data(creds.account_id))
        except Exception as e:  # the attester is the gateway's: any failure is only logged
            log.error("attesting the acme account failed: %s", e)
            return
        await self.storage.put_acme_attestation(
            AcmeAttestation(
                creds.account_id, quoted.quote, quoted.attestation, self.node_id, self.clock()
            )
        )

    # ------------------------------------------------------------------------- renewal

    async def needs_renewal(self, domain: str, settings: CertbotSettings) -> bool:
        cur = await self.storage.get_cert(domain)
        if cur is None:
            return True
        return cur.not_after - self.clock() < settings.renew_before_expiration

    async def _credential(self, config: ZtDomainConfig) -> DnsCredential:
        cred_id = config.dns_cred_id or await self.storage.get_default_dns_credential()
        if not cred_id:
            raise CertbotInputError(
                f"no dns credential for {config.domain} (give it one or set a default)"
            )
        cred = await self.storage.get_dns_credential(cred_id)
        if cred is None:
            raise CertbotInputError(f"dns credential {cred_id} of {config.domain} does not exist")
        return cred

    async def renew(self, domain: str, *, force: bool = False) -> Outcome:
        """renews `domain` if due (or `force`) under its lock; see the module doc. CertbotError
        (or a subclass) when it cannot; the stored certificate then stays as it was."""
        domain = normalize_domain(domain)
        config = await self.storage.get_zt_domain(domain)
        if config is None:
            raise CertbotInputError(f"zt-domain {domain} does not exist")
        settings = await self.storage.get_settings()
        if not force and not await self.needs_renewal(domain, settings):
            return Outcome.FRESH
        name = cert_lock(domain)
        token = await self.lock.acquire(name, self.holder, self.lock_ttl)
        if token is None:
            holder = await self.lock.holder(name)
            log.info("%s is being renewed by %s", domain, holder.holder if holder else "another")
            return Outcome.LOCKED
        try:
            if not force and not await self.needs_renewal(domain, settings):
                return Outcome.FRESH
            await self._issue(config, settings, name, token)
            return Outcome.RENEWED
        finally:
            await self.lock.release(name, token)

    async def _issue(
        self, config: ZtDomainConfig, settings: CertbotSettings, name: str, token: str
    ) -> None:
        domain = config.domain
        creds = await self.account(settings)
        cred = await self._credential(config)
        provider = self.providers(cred.provider, domain)
        try:
            issued = await self._order_with_retries(
                domain, creds, cred, provider, settings, (name, token)
            )
        finally:
            await provider.aclose()
        data = CertData(
            issued.chain_pem, issued.key_pem, issued.not_after, self.node_id, self.clock()
        )
        await self.storage.put_cert(domain, data)
        log.info("issued a certificate for *.%s (until %.0f)", domain, issued.not_after)
        if self.on_cert is not None:
            await self.on_cert(domain, data)
        await self._attest_cert(domain, issued.spki_der)

    async def _order_with_retries(
        self,
        domain: str,
        creds: AcmeCredentials,
        cred: DnsCredential,
        provider: DnsProvider,
        settings: CertbotSettings,
        held: tuple[str, str],
    ) -> IssuedCert:
        name, token = held
        delay = self.retry.first_delay
        attempt = 0
        while True:
            attempt += 1
            if not await self.lock.refresh(name, token, self.lock_ttl):
                raise CertbotError(f"lost the lock {name} before ordering")
            try:
                async with asyncio.timeout(settings.renew_timeout):
                    return await self.backend.issue(
                        creds,
                        domain,
                        provider,
                        txt_ttl=cred.dns_txt_ttl,
                        max_dns_wait=cred.max_dns_wait,
                        timeout=settings.renew_timeout,
                    )
            except (AcmeUnavailableError, TimeoutError) as e:
                error = (
                    e
                    if isinstance(e, AcmeUnavailableError)
                    else AcmeUnavailableError(
                        f"acme order took longer than {settings.renew_timeout:.0f} s"
                    )
                )
                if attempt >= self.retry.attempts:
                    raise error from e
                log.warning(
                    "acme order for %s failed (%s); retry %d/%d in %.1f s",
                    domain, error, attempt, self.retry.attempts - 1, delay,
                )  # fmt: skip
                await self.sleep(delay)
                delay = min(delay * 2, self.retry.max_delay)

    async def _attest_cert(self, domain: str, spki_der: bytes) -> None:
        if self.attester is None:
            return
        try:
            quoted = await self.attester(cert_report_data(spki_der))
        except Exception as e:  # the attester is the gateway's: any failure is only logged
            log.error("attesting the new key of %s failed: %s", domain, e)
            return
        await self.storage.add_cert_attestation(
            domain,
            CertAttestation(spki_der, quoted.quote, quoted.attestation, self.node_id, self.clock()),
        )

    async def renew_all(self, *, force: bool = False) -> dict[str, Outcome | CertbotError]:
        """:meth:`renew` for every ZT-domain; each one's outcome or error (one failing domain
        does not stop the others)."""
        out: dict[str, Outcome | CertbotError] = {}
        for config in await self.storage.list_zt_domains():
            try:
                out[config.domain] = await self.renew(config.domain, force=force)
            except CertbotError as e:
                log.error("renewing %s failed: %s", config.domain, e)
                out[config.domain] = e
        return out

    async def run(self, stop: asyncio.Event) -> None:
        """:meth:`renew_all` now and every ``renew_interval`` until `stop` is set."""
        while not stop.is_set():
            await self.renew_all()
            settings = await self.storage.get_settings()
            interval = settings.renew_interval or IDLE_INTERVAL
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def load_certs(self) -> dict[str, CertData]:
        """every ZT-domain's stored certificate that has not expired (what a node serves)."""
        now = self.clock()
        out = {}
        for config in await self.storage.list_zt_domains():
            data = await self.storage.get_cert(config.domain)
            if data is not None and data.not_after > now:
                out[config.domain] = data
        return out

    async def init_all(self, *, wait: float = INIT_WAIT) -> dict[str, CertData]:
        """the startup pass: each domain's valid certificate, renewed first when it has none or
        is due; a domain renewed elsewhere is waited for (`wait` seconds) and then loaded."""
        locked = False
        for domain, result in (await self.renew_all()).items():
            locked = locked or result is Outcome.LOCKED
            if isinstance(result, CertbotError):
                log.error("no new certificate for %s at startup: %s", domain, result)
        if locked:
            await self.sleep(wait)
        return await self.load_certs()

    # ------------------------------------------------------------------------- caa, rotation

    async def set_caa(self, domain: str, creds: AcmeCredentials | None = None) -> None:
        """pins `domain`'s CAA records to the CA, dns-01 and the account (§5.4)."""
        domain = normalize_domain(domain)
        config = await self.storage.get_zt_domain(domain)
        if config is None:
            raise CertbotInputError(f"zt-domain {domain} does not exist")
        settings = await self.storage.get_settings()
        creds = creds or await self.account(settings)
        provider = self.providers((await self._credential(config)).provider, domain)
        try:
            await self.backend.set_caa(creds, provider, domain, settings.caa_issuer)
        finally:
            await provider.aclose()

    async def set_caa_all(self, creds: AcmeCredentials | None = None) -> dict[str, str]:
        """:meth:`set_caa` for every ZT-domain, best effort; the failures by domain."""
        failed: dict[str, str] = {}
        for config in await self.storage.list_zt_domains():
            try:
                await self.set_caa(config.domain, creds)
            except CertbotError as e:
                log.error("setting caa of %s failed: %s", config.domain, e)
                failed[config.domain] = str(e)
        return failed

    async def rotate_acme_credentials(self) -> RotationResult:
        """a new account (§5.5): every domain's DNS credential is checked first (one that does
        not work refuses the rotation, nothing changed); then the account is made, published,
        CAA re-pinned per domain (failures reported) and the account attested. CertbotError
        while another rotation holds the lock."""
        token = await self.lock.acquire(ROTATION_LOCK, self.holder, self.lock_ttl)
        if token is None:
            raise CertbotError("an acme credential rotation is already running")
        try:
            settings = await self.storage.get_settings()
            configs = await self.storage.list_zt_domains()
            for config in configs:
                provider = self.providers((await self._credential(config)).provider, config.domain)
                try:
                    await provider.check()
                finally:
                    await provider.aclose()
            creds = await self.backend.create_account(settings.directory_url)
            await self.storage.put_acme_credentials(creds)
            failed = await self.set_caa_all(creds)
            await self.attest_account(creds)
            updated = [c.domain for c in configs if c.domain not in failed]
            return RotationResult(creds.account_id, updated, failed)
        finally:
            await self.lock.release(ROTATION_LOCK, token)

    # ------------------------------------------------------------------------- acme info

    async def acme_info(self) -> AcmeInfo:
        """the account and every attested key of every domain (AcmeInfo)."""
        creds = await self.storage.get_acme_credentials()
        att = await self.storage.get_acme_attestation()
        keys = []
        for domain in await self.storage.list_cert_domains():
            for a in await self.storage.list_cert_attestations(domain):
                keys.append(QuotedPublicKey(a.public_key, a.quote, a.attestation))
        return AcmeInfo(
            account_uri=creds.account_id if creds else "",
            quoted_hist_keys=keys,
            account_quote=att.quote if att else "",
            account_attestation=att.attestation if att else "",
        )
