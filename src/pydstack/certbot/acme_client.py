"""the shared ACME account and the DNS-01 order flow (gateway notes §5.2, §5.4), on the ``acme``
library.

:meth:`AcmeAccount.create` registers an account (P-256 key, ``termsOfServiceAgreed``, no
contact) at a directory; :meth:`AcmeAccount.issue` orders ``*.<domain>`` with a fresh P-256 key:

1. for each pending authorization, its ``dns-01`` challenge (none: refused); the TXT value and
   name ``_acme-challenge.<domain>``;
2. every TXT record already at that name is deleted, one per challenge added (a provider that
   refuses one leaves nothing behind: the records this order created are removed before the
   error is raised);
3. the self-check (:mod:`.dnscheck`) up to `max_dns_wait`, then the challenges are answered;
4. the authorizations are polled; the order finalized with a CSR (empty subject, the SAN), and
   the chain downloaded, retried up to 5 times;
5. the TXT records it created are always deleted.

Errors: :class:`AcmeUnavailableError` for an unreachable server, a 5xx answer or a timeout
(worth a retry); :class:`AcmeRefusedError` for a refused account, order or challenge, with the
server's problem text; :class:`DnsProviderError` from the provider.

:func:`set_caa_records` pins a domain's CAA to the CA, the method and the account (§5.4).

The ``acme`` library is synchronous (``requests``): its calls run in a worker thread, each
operation on its own client.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
from acme import challenges, client, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWK, JWKEC

from pydstack.crypto.certload import load_certs_pem

from .dns01 import ACME_CHALLENGE, CAA, TXT, DnsProvider, caa_content
from .dnscheck import make_resolver, wait_for_txt
from .errors import AcmeRefusedError, AcmeUnavailableError, CertbotError, DnsProviderError
from .model import AcmeCredentials

log = logging.getLogger(__name__)
T = TypeVar("T")

USER_AGENT = "dstack-certbot/0.1"
DOWNLOAD_TRIES = 5
CAA_TAGS = ("issue", "issuewild")
CAA_GUARD = ";"


@dataclass(frozen=True)
class AcmeOptions:
    """this node's way to the ACME server and the DNS.

    `ca_bundle`: a PEM file of roots for the ACME server's TLS (a test server's own CA; None:
    the system roots). `dns_servers`: ``host:port`` resolvers for the self-check (empty: the
    system's)."""

    ca_bundle: str | None = None
    user_agent: str = USER_AGENT
    network_timeout: float = 30.0
    dns_servers: tuple[str, ...] = ()
    download_retry_delay: float = 1.0


@dataclass(frozen=True)
class IssuedCert:
    """a chain (leaf first, PEM), its fresh private key (PKCS#8 PEM), and the leaf's expiry and
    SubjectPublicKeyInfo (DER)."""

    chain_pem: str
    key_pem: str
    not_after: float
    spki_der: bytes


def _problem(e: messages.Error) -> str:
    return str(e.detail or e.description or e.typ or "unknown problem")[:512]


def _classify(what: str, e: Exception) -> CertbotError:
    """a library or network exception as the error the certbot acts on."""
    if isinstance(e, requests.exceptions.RequestException | errors.TimeoutError):
        return AcmeUnavailableError(
            f"acme {what}: server unreachable or too slow: {type(e).__name__}"
        )
    if isinstance(e, errors.ValidationError):
        probs = []
        for authzr in e.failed_authzrs:
            for ch in authzr.body.challenges:
                if ch.error is not None:
                    probs.append(f"{authzr.body.identifier.value}: {_problem(ch.error)}")
        return AcmeRefusedError(f"acme {what}: challenge failed: {'; '.join(probs)}")
    if isinstance(e, messages.Error):
        if e.code in ("serverInternal", "rateLimited") or e.code is None:
            return AcmeUnavailableError(f"acme {what}: {_problem(e)}")
        return AcmeRefusedError(f"acme {what}: {e.code}: {_problem(e)}")
    if isinstance(e, errors.ClientError):
        return AcmeUnavailableError(f"acme {what}: unexpected answer from the server")
    if isinstance(e, errors.Error):
        return AcmeRefusedError(f"acme {what}: {str(e)[:512]}")
    raise e


async def _call(what: str, fn: Callable[..., T], *args: Any) -> T:
    try:
        return await asyncio.to_thread(fn, *args)
    except (requests.exceptions.RequestException, errors.Error, messages.Error) as e:
        raise _classify(what, e) from e


def _network(key: JWK, options: AcmeOptions) -> client.ClientNetwork:
    net = client.ClientNetwork(
        key, alg=ES256, user_agent=options.user_agent, timeout=int(options.network_timeout)
    )
    if options.ca_bundle is not None:
        # requests takes a ca bundle path where the library's annotation says bool
        net.verify_ssl = options.ca_bundle  # type: ignore[assignment]
    return net


def _jwk(key_pkcs8: bytes) -> JWKEC:
    key = serialization.load_der_private_key(key_pkcs8, None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise CertbotError("acme account key must be a p-256 key")
    return JWKEC(key=key)


def new_key_pem() -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key, pem.decode()


def make_csr(key: ec.EllipticCurvePrivateKey, names: list[str]) -> bytes:
    """a CSR with an empty subject and `names` as DNS SANs (PEM)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def parse_chain(
    chain_pem: str, key: ec.EllipticCurvePrivateKey | None = None
) -> tuple[float, bytes]:
    """(not_after, leaf SPKI DER) of a PEM chain, leaf first; CertbotError when it does not
    parse or its leaf is not for `key`."""
    try:
        certs = load_certs_pem(chain_pem)
    except ValueError as e:
        raise CertbotError(f"the issued chain does not parse: {e}") from e
    leaf = certs[0]
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if key is not None:
        ours = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if ours != spki:
            raise CertbotError("the issued certificate is not for the key of the order")
    return leaf.not_valid_after_utc.timestamp(), spki


class AcmeAccount:
    """one ACME account (its credentials) and the operations made with it."""

    def __init__(self, credentials: AcmeCredentials, options: AcmeOptions | None = None) -> None:
        self.credentials = credentials
        self.options = options or AcmeOptions()
        self._key = _jwk(credentials.key_pkcs8)

    @property
    def uri(self) -> str:
        return self.credentials.account_id

    @classmethod
    async def create(cls, directory_url: str, options: AcmeOptions | None = None) -> AcmeAccount:
        """registers a new account at `directory_url`; AcmeUnavailableError/AcmeRefusedError."""
        opts = options or AcmeOptions()
        key = ec.generate_private_key(ec.SECP256R1())
        pkcs8 = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

        def register() -> str:
            net = _network(JWKEC(key=key), opts)
            directory = client.ClientV2.get_directory(directory_url, net)
            acme = client.ClientV2(directory, net)
            reg = messages.NewRegistration.from_data(terms_of_service_agreed=True)
            return str(acme.new_account(reg).uri)

        uri = await _call("account creation", register)
        log.info("acme account created at %s", uri)
        return cls(AcmeCredentials(uri, directory_url, pkcs8), opts)

    def _client(self) -> client.ClientV2:
        net = _network(self._key, self.options)
        net.account = messages.RegistrationResource(
            body=messages.Registration(), uri=self.credentials.account_id
        )
        directory = client.ClientV2.get_directory(self.credentials.acme_url, net)
        return client.ClientV2(directory, net)

    async def issue(
        self,
        domain: str,
        provider: DnsProvider,
        *,
        txt_ttl: int = 60,
        max_dns_wait: float = 300.0,
        timeout: float = 300.0,
    ) -> IssuedCert:
        """a ``*.<domain>`` certificate with a fresh key (see the module doc for the flow)."""
        key, key_pem = new_key_pem()
        csr = make_csr(key, [f"*.{domain}"])
        deadline = dt.datetime.now() + dt.timedelta(seconds=timeout)
        acme = await _call("directory", self._client)
        order = await _call("new order", acme.new_order, csr)
        created: list[str] = []
        try:
            answers, expected = self._challenges(order)
            if answers:
                await self._publish(provider, expected, txt_ttl, created)
                await wait_for_txt(
                    expected, max_dns_wait, resolver=make_resolver(self.options.dns_servers)
                )
                for chall in answers:
                    await _call(
                        "challenge", acme.answer_challenge, chall, chall.chall.response(self._key)
                    )
            order = await _call("authorization", acme.poll_authorizations, order, deadline)
            order = await self._finalize(acme, order, deadline)
        finally:
            await _cleanup(provider, created)
        chain = order.fullchain_pem
        if not chain:
            raise AcmeRefusedError("acme order is valid but has no certificate")
        not_after, spki = parse_chain(chain, key)
        return IssuedCert(chain, key_pem, not_after, spki)

    def _challenges(
        self, order: messages.OrderResource
    ) -> tuple[list[messages.ChallengeBody], dict[str, set[str]]]:
        answers: list[messages.ChallengeBody] = []
        expected: dict[str, set[str]] = {}
        for authz in order.authorizations:
            if authz.body.status != messages.STATUS_PENDING:
                continue
            ident = authz.body.identifier.value
            chall = next(
                (c for c in authz.body.challenges if isinstance(c.chall, challenges.DNS01)), None
            )
            if chall is None:
                raise AcmeRefusedError(f"acme offers no dns-01 challenge for {ident}")
            assert isinstance(chall.chall, challenges.DNS01)
            fqdn = chall.chall.validation_domain_name(ident)
            expected.setdefault(fqdn, set()).add(chall.chall.validation(self._key))
            answers.append(chall)
        return answers, expected

    @staticmethod
    async def _publish(
        provider: DnsProvider, expected: dict[str, set[str]], ttl: int, created: list[str]
    ) -> None:
        for fqdn in expected:
            for rec in await provider.list_records(fqdn, TXT):
                await provider.delete_record(rec.id)
        for fqdn, values in expected.items():
            for value in sorted(values):
                created.append(await provider.add_txt(fqdn, value, ttl))

    async def _finalize(
        self, acme: client.ClientV2, order: messages.OrderResource, deadline: dt.datetime
    ) -> messages.OrderResource:
        try:
            return await _call("finalize", acme.finalize_order, order, deadline)
        except AcmeUnavailableError as first:
            error = first
        # the order may be valid with only the download lost: poll (and download) again
        for _ in range(DOWNLOAD_TRIES - 1):
            await asyncio.sleep(self.options.download_retry_delay)
            try:
                return await _call("certificate download", acme.poll_finalization, order, deadline)
            except AcmeUnavailableError as e:
                error = e
        raise error


async def _cleanup(provider: DnsProvider, created: list[str]) -> None:
    for rid in created:
        try:
            await provider.delete_record(rid)
        except DnsProviderError as e:
            log.warning("could not remove a dns-01 record: %s", e)


def challenge_name(domain: str) -> str:
    return f"{ACME_CHALLENGE}.{domain}"


def caa_value(issuer: str, account_uri: str) -> str:
    """what the CAA records pin: the CA, the dns-01 method and the account."""
    return f"{issuer};validationmethods=dns-01;accounturi={account_uri}"


async def set_caa_records(
    provider: DnsProvider, domain: str, issuer: str, account_uri: str
) -> None:
    """pins ``<domain>``'s CAA ``issue`` and ``issuewild`` to `issuer`, dns-01 and the account.

    Guards (``0 issue ";"``, ``0 issuewild ";"``) go up first, so no moment allows any CA; then
    the pinned records (unless present), then every other issue/issuewild record is deleted, then
    the guards. If a record cannot be added, the records this call added are removed and the
    error raised (what was there stays); a failure while deleting still takes the guards down.
    """
    want = caa_value(issuer, account_uri)
    existing = await provider.list_records(domain, CAA)
    have = {(r.caa_tag, r.content) for r in existing}
    guards: list[str] = []
    added: list[str] = []
    try:
        for tag in CAA_TAGS:
            guards.append(await provider.add_caa(domain, 0, tag, CAA_GUARD))
        for tag in CAA_TAGS:
            if (tag, caa_content(0, tag, want)) not in have:
                added.append(await provider.add_caa(domain, 0, tag, want))
    except DnsProviderError:
        await _cleanup(provider, added + guards)
        raise
    try:
        for rec in existing:
            if rec.caa_tag in CAA_TAGS and rec.content != caa_content(0, rec.caa_tag, want):
                await provider.delete_record(rec.id)
    finally:
        for rid in guards:
            await provider.delete_record(rid)
