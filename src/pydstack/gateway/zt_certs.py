"""the distributed certbot inside the gateway (gateway notes §5.5): the ZT-domains' certificates
from storage into the :class:`~.certstore.CertStore` the relay workers serve, and the renewal.

:class:`ZtCerts` ties a :class:`~pydstack.certbot.certbot.Certbot` to the gateway:

* :meth:`ZtCerts.sync` loads every ZT-domain's stored, unexpired certificate that differs from
  the one served (a certificate another process or node stored is picked up the same way; one
  that does not load is logged and the one served stays), re-reads the attested key history for
  ``/.dstack/acme-info`` and hands what changed to the workers (`changed`): a hot reload, no
  restart;
* :meth:`ZtCerts.on_cert` is the certbot's hook: a certificate it just issued is served at once;
* :meth:`ZtCerts.run` is the background task: :meth:`sync` at once (the stored certificates
  serve from the first connection), then a renewal pass (:meth:`Certbot.renew_all`, with the
  certbot's retries while the ACME server is down; the certificate served stays until a new
  one is stored) every ``renew_interval`` of ``global/certbot_config`` (0: every minute) and a
  :meth:`sync` every :data:`SYNC_INTERVAL` seconds in between; :meth:`ZtCerts.kick` (a
  ZT-domain or the settings changed) starts a pass at once. No pass ever ends the task;
* :meth:`ZtCerts.renew_now` is the admin's renewal: one attempt, its error to the caller;
* :meth:`ZtCerts.acme_info` is ``Gateway.AcmeInfo``: the account and every attested key.

The legacy static certificate (``[core.proxy] cert_chain/cert_key``) is not the certbot's: it
stays in the store unless a ZT-domain of the same name gets a certificate, which then replaces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import Awaitable, Callable

from pydstack.certbot.certbot import IDLE_INTERVAL, Certbot, Outcome, RetryPolicy
from pydstack.certbot.errors import CertbotError
from pydstack.certbot.model import CertData, ZtDomainConfig, best_zt_domain
from pydstack.rpc.proto import gateway_rpc_pb2 as pb

from .certstore import CertStore, CertStoreError

log = logging.getLogger(__name__)

#: seconds between two looks at storage for certificates stored elsewhere
SYNC_INTERVAL = 5.0

Changed = Callable[[], Awaitable[None]]


class ZtCerts:
    """the certbot `certbot` feeding `certs`; `changed` publishes the store and the acme info
    to the workers (the pool's ``refresh_info`` then ``publish``)."""

    def __init__(
        self,
        certbot: Certbot,
        certs: CertStore,
        *,
        changed: Changed,
        node_id: int = 0,
        sync_interval: float = SYNC_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.certbot = certbot
        self.storage = certbot.storage
        self.certs = certs
        self.changed = changed
        self.node_id = node_id
        self.sync_interval = sync_interval
        self.clock = clock
        #: the best ZT-domain (upstream's ``get_best_zt_domain``), None while there is none
        self.best: ZtDomainConfig | None = None
        self._kicked = asyncio.Event()
        certbot.on_cert = self.on_cert
        # the admin's renewal tries once: the operator sees the error and decides
        self.interactive = copy.copy(certbot)
        self.interactive.retry = RetryPolicy(attempts=1)

    def loaded(self, domain: str) -> bool:
        """whether the store serves a certificate for `domain` (``loaded_in_memory``)."""
        return self.certs.get(domain) is not None

    def _load(self, domain: str, data: CertData) -> bool:
        cur = self.certs.get(domain)
        if cur is not None and cur.chain_pem == data.cert_pem and cur.key_pem == data.key_pem:
            return False
        try:
            self.certs.set(domain, data.cert_pem, data.key_pem)
        except CertStoreError as e:
            log.error("the stored certificate of %s is not served: %s", domain, e)
            return False
        log.info("serving the certificate of *.%s (until %.0f)", domain, data.not_after)
        return True

    async def on_cert(self, domain: str, data: CertData) -> None:
        """the certbot's hook: serve the certificate just issued (never raises)."""
        if self._load(domain, data):
            try:
                await self.changed()
            except Exception:  # the workers catch up at the next sync
                log.exception("publishing the certificate of %s failed", domain)

    async def sync(self) -> list[str]:
        """loads what storage holds and the store does not serve; publishes; the domains whose
        certificate changed. CertbotError when storage cannot be read (nothing changed then)."""
        stored = await self.certbot.load_certs()
        self.best = best_zt_domain(await self.storage.list_zt_domains(), self.node_id)
        loaded = [d for d, data in sorted(stored.items()) if self._load(d, data)]
        await self.changed()
        return loaded

    async def renew_now(self, domain: str, *, force: bool = False) -> Outcome:
        """one renewal attempt of `domain` (the admin's RenewZtDomainCert); CertbotError when it
        fails, the served certificate then unchanged."""
        try:
            return await self.interactive.renew(domain, force=force)
        finally:
            with contextlib.suppress(CertbotError):
                await self.sync()

    async def renew_all(self, *, force: bool = False) -> dict[str, Outcome | CertbotError]:
        """the renewal pass (with retries), then a sync so new attestations reach acme-info."""
        try:
            return await self.certbot.renew_all(force=force)
        finally:
            with contextlib.suppress(CertbotError):
                await self.sync()

    async def acme_info(self) -> pb.AcmeInfoResponse:
        info = await self.certbot.acme_info()
        return pb.AcmeInfoResponse(
            account_uri=info.account_uri,
            quoted_hist_keys=[
                pb.QuotedPublicKey(
                    public_key=k.public_key, quote=k.quote, attestation=k.attestation
                )
                for k in info.quoted_hist_keys
            ],
            account_quote=info.account_quote,
            account_attestation=info.account_attestation,
        )

    def kick(self) -> None:
        """makes the background task start a renewal pass now (a ZT-domain or the settings
        changed)."""
        self._kicked.set()

    async def _wait(self, stop: asyncio.Event, seconds: float) -> None:
        waiters = [asyncio.ensure_future(e.wait()) for e in (stop, self._kicked)]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def run(self, stop: asyncio.Event) -> None:
        """the background task (see the module doc) until `stop` is set."""
        try:
            await self.sync()
        except Exception:
            log.exception("loading the stored certificates failed")
        next_pass = self.clock()
        while not stop.is_set():
            if self._kicked.is_set():
                self._kicked.clear()
                next_pass = self.clock()
            try:
                if self.clock() >= next_pass:
                    next_pass = self.clock() + IDLE_INTERVAL
                    await self.renew_all()
                    settings = await self.storage.get_settings()
                    next_pass = self.clock() + (settings.renew_interval or IDLE_INTERVAL)
                else:
                    await self.sync()
            except Exception:  # storage or a bug: logged, and the next pass tries again
                log.exception("the certbot pass failed")
            await self._wait(stop, max(0.0, min(self.sync_interval, next_pass - self.clock())))
