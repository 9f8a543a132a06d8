"""quote verification: dcap-qvl under a policy that fails closed.

dcap-qvl checks the signatures (TCB info, QE identity, PCK chain to the given root with CRLs, QE
report, QE hash binding, ISV signature) and matches the platform TCB level. On top of it:
* the TCB status must be in the policy's allowed set (default: UpToDate only), and every
  advisory must be allowed when the policy lists advisories;
* debug TDs and TDs with a non-zero MR_SIGNER_SEAM are refused, always (there is no switch:
  dcap-qvl refuses debug TDs too, so such a switch could never take effect);
* collateral whose TCB info was issued longer ago than the policy's maximum age is refused;
* a platform whose TCB is below every level of the TCB info gets the status
  ``TcbNotSupported`` (Intel's QVL: TCB_NOT_SUPPORTED) — dcap-qvl reports "no matching TCB
  level", which it only reaches after every signature check passed.

A simulated quote is accepted only when the caller passes the mock root explicitly; there is no
switch that skips verification.

Before any collateral is looked up, :func:`precheck_quote` verifies what the quote carries by
itself (PCK chain to the root, QE report signature, QE report binding of the attestation key,
the quote's own signature), so an unsigned or forged quote never costs a PCCS request; the
:class:`CollateralCache` does this on every lookup, fetches each FMSPC at most once at a time and
a bounded number of FMSPCs at once, and answers cached lookups without waiting on any fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dcap_qvl
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from pydstack.crypto.certload import load_cert_der, load_certs_pem
from pydstack.types import jsonlimits

from .errors import ParseError, VerifyError
from .intel_root import INTEL_SGX_ROOT_CA_DER
from .quote import Quote, parse_quote

log = logging.getLogger(__name__)

STATUS_NOT_SUPPORTED = "TcbNotSupported"
_NO_MATCHING_LEVEL = "No matching TCB level found"


@dataclass(frozen=True)
class VerificationPolicy:
    allowed_tcb_statuses: frozenset[str] = frozenset({"UpToDate"})
    #: None: any advisory is fine once the status is allowed; else every advisory must be listed
    allowed_advisory_ids: frozenset[str] | None = None
    max_collateral_age_seconds: int | None = None

    @classmethod
    def from_config(cls, obj: dict[str, Any]) -> VerificationPolicy:
        adv = obj.get("allowed_advisory_ids")
        return cls(
            allowed_tcb_statuses=frozenset(obj.get("allowed_tcb_statuses", ["UpToDate"])),
            allowed_advisory_ids=None if adv is None else frozenset(adv),
            max_collateral_age_seconds=obj.get("max_collateral_age_seconds"),
        )


@dataclass(frozen=True, slots=True)
class VerifiedQuote:
    status: str
    advisory_ids: tuple[str, ...]
    ppid: bytes
    quote: Quote
    fmspc: str


def _collateral_obj(collateral: Any) -> Any:
    if isinstance(collateral, dcap_qvl.QuoteCollateralV3):
        return collateral
    if isinstance(collateral, dict):
        collateral = json.dumps(collateral)
    if isinstance(collateral, bytes):
        collateral = collateral.decode()
    if not isinstance(collateral, str):
        raise VerifyError("collateral must be QuoteCollateralV3, its json text or a dict")
    return _parsed_collateral(collateral)


@functools.lru_cache(maxsize=64)
def _parsed_collateral(text: str) -> Any:
    """collateral JSON parsed once per text (parsing costs more than a verification)."""
    try:
        return dcap_qvl.QuoteCollateralV3.from_json(text)
    except ValueError as e:
        raise VerifyError(f"invalid collateral: {e}") from e


def _issue_date(collateral: Any) -> int | None:
    try:
        issue = jsonlimits.loads(collateral.tcb_info)["issueDate"]
        return int(dt.datetime.fromisoformat(issue.replace("Z", "+00:00")).timestamp())
    except (ValueError, KeyError, TypeError):
        return None


@functools.lru_cache(maxsize=64)
def _next_update(collateral_json: str) -> float | None:
    """the nextUpdate of a collateral's TCB info (read once per text), None if unreadable."""
    try:
        tcb = jsonlimits.loads(jsonlimits.loads(collateral_json)["tcb_info"])
        return dt.datetime.fromisoformat(tcb["nextUpdate"].replace("Z", "+00:00")).timestamp()
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def verify_quote(
    quote_bytes: bytes,
    collateral: Any,
    *,
    policy: VerificationPolicy | None = None,
    root_ca_der: bytes | None = None,
    now: int | None = None,
    parsed: Quote | None = None,
) -> VerifiedQuote:
    """verify a quote under `policy`; raises VerifyError naming why it is refused. `parsed`:
    the caller's parse of these very bytes, to save parsing them again."""
    policy = policy or VerificationPolicy()
    now = int(time.time()) if now is None else now
    try:
        quote = parse_quote(quote_bytes) if parsed is None else parsed
    except ParseError as e:
        raise VerifyError(f"malformed quote: {e}") from e
    report_td = quote.td_report
    if report_td is not None:
        # before dcap-qvl, so a debug td is refused by this check and its reason, whatever
        # a dcap-qvl release does about debug tds
        if report_td.is_debug:
            raise VerifyError("debug td refused")
        if report_td.mr_signer_seam.strip(b"\0"):
            raise VerifyError("td refused: mr_signer_seam is not zero")
    col = _collateral_obj(collateral)
    if policy.max_collateral_age_seconds is not None:
        issued = _issue_date(col)
        if issued is None or now - issued > policy.max_collateral_age_seconds:
            raise VerifyError(
                f"collateral too old: tcb info issued more than "
                f"{policy.max_collateral_age_seconds} s ago"
            )
    try:
        if root_ca_der is None:
            report = dcap_qvl.verify(quote_bytes, col, now)
        else:
            report = dcap_qvl.verify_with_root_ca(quote_bytes, col, root_ca_der, now)
    except ValueError as e:
        msg = str(e)
        if _NO_MATCHING_LEVEL in msg:
            raise VerifyError(
                f"tcb status {STATUS_NOT_SUPPORTED} is not allowed: the platform tcb matches "
                "no level in the tcb info"
            ) from e
        first = msg.split("\n", 1)[0].removeprefix("Verification failed: ")
        detail = " ".join(line.strip() for line in msg.split("\n")[1:] if line.strip())
        reason = f"{first} ({detail})" if detail else first
        if reason[:1].isupper() and reason[1:2].islower():
            reason = reason[:1].lower() + reason[1:]
        raise VerifyError(f"quote verification failed: {reason}") from e
    status = str(report.status)
    advisories = tuple(map(str, report.advisory_ids))
    if status not in policy.allowed_tcb_statuses:
        adv = f" (advisories: {', '.join(advisories)})" if advisories else ""
        raise VerifyError(f"tcb status {status} is not allowed{adv}")
    if policy.allowed_advisory_ids is not None:
        bad = [a for a in advisories if a not in policy.allowed_advisory_ids]
        if bad:
            raise VerifyError(f"advisories not allowed: {', '.join(bad)}")
    fmspc = ""
    with contextlib.suppress(ValueError):
        fmspc = _claimed_fmspc(quote.pck_cert_chain_pem)
    return VerifiedQuote(status, advisories, bytes(report.ppid), quote, fmspc)


def _p256_verify(key: ec.EllipticCurvePublicKey, raw_sig: bytes, data: bytes) -> bool:
    """a raw 64-byte r || s ECDSA-P256-SHA256 signature over `data`."""
    if len(raw_sig) != 64:
        return False
    der = encode_dss_signature(
        int.from_bytes(raw_sig[:32], "big"), int.from_bytes(raw_sig[32:], "big")
    )
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _p256_key(cert: x509.Certificate, what: str) -> ec.EllipticCurvePublicKey:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise VerifyError(f"{what} key is unusable: {e}") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise VerifyError(f"{what} key is not a P-256 key")
    return key


def _check_validity(cert: x509.Certificate, what: str, now: int) -> None:
    if not cert.not_valid_before_utc.timestamp() <= now <= cert.not_valid_after_utc.timestamp():
        raise VerifyError(f"{what} is not valid at this time")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate, what: str, by: str) -> None:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as e:
        raise VerifyError(f"{what} is not signed by the {by}") from e


@functools.lru_cache(maxsize=8)
def _root_cert(root_ca_der: bytes) -> x509.Certificate:
    """the configured root, parsed once (only well-formed roots are cached)."""
    try:
        root = load_cert_der(root_ca_der)
    except ValueError as e:
        raise VerifyError(f"the configured root ca is not a der certificate: {e}") from e
    _p256_key(root, "root ca")
    return root


@functools.lru_cache(maxsize=32)
def _pck_ca(ca_der: bytes, root_ca_der: bytes) -> x509.Certificate:
    """a PCK CA certificate verified against the root; only verified ones are cached, so the
    cache holds the root's few genuine intermediates and nothing an attacker chose."""
    root = _root_cert(root_ca_der)
    ca = load_cert_der(ca_der)
    _p256_key(ca, "pck ca certificate")
    _issued_by(ca, root, "pck ca certificate", "configured root ca")
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError) as e:
        raise VerifyError("pck ca certificate has no usable basic constraints") from e
    if not constraints.ca:
        raise VerifyError("pck ca certificate is not a ca")
    return ca


def _fmspc(leaf: x509.Certificate) -> str:
    try:
        ext = dcap_qvl.parse_pck_extension_from_pem(leaf.public_bytes(serialization.Encoding.PEM))
        fmspc = bytes(ext.fmspc)
    except (ValueError, TypeError) as e:
        raise VerifyError(f"pck certificate has no readable sgx extension: {e}") from e
    if len(fmspc) != 6:
        raise VerifyError("pck certificate fmspc must be 6 bytes")
    return fmspc.hex().upper()


@functools.lru_cache(maxsize=256)
def _claimed_fmspc(chain_pem: bytes) -> str:
    """the FMSPC a PCK chain's leaf names, unverified (a cache key only)."""
    try:
        return _fmspc(load_certs_pem(chain_pem)[0])
    except (ValueError, IndexError) as e:
        raise VerifyError(f"pck certificate chain is malformed: {e}") from e


@dataclass(frozen=True)
class _PckChain:
    leaf: x509.Certificate
    ca: x509.Certificate
    leaf_key: ec.EllipticCurvePublicKey
    fmspc: str


@functools.lru_cache(maxsize=64)
def _pck_chain(chain_pem: bytes, root_ca_der: bytes) -> _PckChain:
    """a quote's PCK chain checked by signature up to the root (validity times excepted); only
    chains that pass are cached."""
    root = _root_cert(root_ca_der)
    try:
        chain = load_certs_pem(chain_pem)
    except ValueError as e:
        raise VerifyError(f"pck certificate chain is malformed: {e}") from e
    if len(chain) != 3:
        raise VerifyError(f"pck certificate chain must hold 3 certificates, not {len(chain)}")
    leaf, ca_cert, chain_root = chain
    if _p256_key(chain_root, "pck chain root") != _p256_key(root, "root ca"):
        raise VerifyError("pck certificate chain does not end in the configured root ca")
    ca = _pck_ca(ca_cert.public_bytes(serialization.Encoding.DER), root_ca_der)
    _issued_by(leaf, ca, "pck certificate", "pck ca")
    return _PckChain(leaf, ca, _p256_key(leaf, "pck certificate"), _fmspc(leaf))


def precheck_quote(
    quote_bytes: bytes, root_ca_der: bytes | None = None, *, now: int | None = None
) -> str:
    """verify what a quote carries by itself; returns its FMSPC (upper-case hex).

    Checks, without any collateral: the PCK chain in the quote is exactly leaf, PCK CA and a
    root whose key is the configured root's (`root_ca_der`, default Intel's SGX root), each
    signed by the next and valid at `now`; the QE report is signed by the PCK leaf key; the QE
    report_data is sha256(attestation key || QE auth data) followed by 32 zero bytes; the
    quote's signature over its header and body verifies with the attestation key. Raises
    VerifyError ("quote verification failed: <the first failure>"). CRLs, TCB info and the QE
    identity are not checked here: `verify_quote` (dcap-qvl) does the full verification with
    the collateral afterwards.
    Parsed roots and PCK chains that passed are cached (nothing that failed is), so a known
    platform's quote costs two ECDSA verifications and a new chain two or three more.
    """
    try:
        return _precheck(quote_bytes, root_ca_der, int(time.time()) if now is None else now)
    except VerifyError as e:
        raise VerifyError(f"quote verification failed: {e}") from e


def _precheck(quote_bytes: bytes, root_ca_der: bytes | None, now: int) -> str:
    try:
        quote = parse_quote(quote_bytes)
    except ParseError as e:
        raise VerifyError(f"malformed quote: {e}") from e
    root_der = INTEL_SGX_ROOT_CA_DER if root_ca_der is None else root_ca_der
    chain = _pck_chain(quote.pck_cert_chain_pem, root_der)
    _check_validity(chain.leaf, "pck certificate", now)
    _check_validity(chain.ca, "pck ca certificate", now)
    pck_key = chain.leaf_key
    if not _p256_verify(pck_key, quote.qe_report_signature, quote.qe_report_raw):
        raise VerifyError("qe report signature does not verify with the pck certificate key")
    binding = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest() + bytes(32)
    if quote.qe_report.report_data != binding:
        raise VerifyError("qe report does not bind the attestation key")
    try:
        att_key = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), b"\x04" + quote.attestation_key
        )
    except ValueError as e:
        raise VerifyError("quote attestation key is not a p-256 point") from e
    if not _p256_verify(att_key, quote.ecdsa_signature, quote.signed_bytes):
        raise VerifyError("quote signature does not verify with its attestation key")
    return chain.fmspc


class CollateralCache:
    """collateral by FMSPC: in memory, optionally on disk, fetched from a PCCS when missing
    or past its nextUpdate.

    `get` prechecks the quote first (:func:`precheck_quote`): a quote that fails never reaches
    the cache or the PCCS. A fresh cached entry is returned without waiting on anyone; a missing
    one is fetched once however many callers want it at the same time (they all get its result
    or its error; a failed fetch is not cached, so the next caller tries again), and at most
    `max_fetches` FMSPCs are fetched at once.
    """

    def __init__(
        self, pccs_url: str | None = None, cache_dir: Path | None = None, max_fetches: int = 4
    ) -> None:
        if max_fetches < 1:
            raise ValueError("max_fetches must be at least 1")
        self.pccs_url = pccs_url
        self.cache_dir = cache_dir
        self.max_fetches = max_fetches
        self._mem: dict[str, str] = {}
        self._fetch_slots = asyncio.Semaphore(max_fetches)
        self._flights: dict[str, asyncio.Future[str]] = {}
        self.fetches = 0

    @staticmethod
    def _fmspc(quote: bytes) -> str:
        try:
            return str(dcap_qvl.parse_quote(quote).fmspc()).upper()
        except ValueError as e:
            raise VerifyError(f"cannot read the fmspc of the quote: {e}") from e

    @staticmethod
    def _fresh(collateral_json: str, now: int) -> bool:
        nxt = _next_update(collateral_json)
        return nxt is not None and now < nxt

    def put(self, fmspc: str, collateral_json: str) -> None:
        self._mem[fmspc.upper()] = collateral_json
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            (self.cache_dir / f"{fmspc.upper()}.json").write_text(collateral_json)

    def seed_from_file(self, quote: bytes, path: Path) -> None:
        self.put(self._fmspc(quote), path.read_text())

    def load_file(self, path: Path) -> str:
        """add the collateral in `path` (QuoteCollateralV3 JSON, e.g. saved from a PCCS for
        offline use) under the FMSPC its TCB info names; returns that FMSPC. VerifyError when
        the file is not such collateral."""
        try:
            text = path.read_text()
            fmspc = str(jsonlimits.loads(jsonlimits.loads(text)["tcb_info"])["fmspc"]).upper()
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise VerifyError(f"{path.name} is not collateral json with a tcb info: {e}") from e
        if len(fmspc) != 12 or not all(c in "0123456789ABCDEF" for c in fmspc):
            raise VerifyError(f"{path.name}: tcb info fmspc {fmspc[:16]!r} is not 6 hex bytes")
        _collateral_obj(text)
        self._mem[fmspc] = text
        return fmspc

    def cached(self, fmspc: str, now: int) -> str | None:
        hit = self._mem.get(fmspc)
        if hit is None and self.cache_dir is not None:
            path = self.cache_dir / f"{fmspc}.json"
            if path.is_file():
                hit = path.read_text()
                self._mem[fmspc] = hit
        if hit is not None and self._fresh(hit, now):
            return hit
        return None

    async def lookup(
        self,
        quote: bytes,
        now: int | None = None,
        *,
        root_ca_der: bytes | None = None,
        parsed: Quote | None = None,
    ) -> str:
        """like :meth:`get`, but a fresh cached entry for the FMSPC the quote's PCK certificate
        claims is returned without the precheck: for callers that verify the quote with
        dcap-qvl right after (which checks everything the precheck does), so a forged quote is
        refused there and still never costs a PCCS request. A miss prechecks as `get` does."""
        now = int(time.time()) if now is None else now
        try:
            chain = (parse_quote(quote) if parsed is None else parsed).pck_cert_chain_pem
            fmspc = _claimed_fmspc(chain)
        except (ParseError, VerifyError):
            fmspc = ""
        hit = self.cached(fmspc, now) if fmspc else None
        if hit is not None:
            return hit
        return await self.get(quote, now, root_ca_der=root_ca_der)

    async def get(
        self, quote: bytes, now: int | None = None, *, root_ca_der: bytes | None = None
    ) -> str:
        """collateral JSON for the quote's FMSPC; raises VerifyError when the quote fails the
        precheck under `root_ca_der` (default Intel's root) or no collateral can be had."""
        now = int(time.time()) if now is None else now
        fmspc = precheck_quote(quote, root_ca_der, now=now)
        hit = self.cached(fmspc, now)
        if hit is not None:
            return hit
        if not self.pccs_url:
            raise VerifyError(f"no collateral for fmspc {fmspc} and no pccs url configured")
        flight = self._flights.get(fmspc)
        if flight is None:
            flight = asyncio.ensure_future(self._fetch(self.pccs_url, fmspc, quote))
            self._flights[fmspc] = flight
            flight.add_done_callback(functools.partial(self._landed, fmspc))
        # shielded: one caller giving up does not cancel the fetch the others wait for
        return await asyncio.shield(flight)

    def _landed(self, fmspc: str, flight: asyncio.Future[str]) -> None:
        if self._flights.get(fmspc) is flight:
            del self._flights[fmspc]
        if not flight.cancelled():
            flight.exception()  # retrieved here: waiters may all have gone

    async def _fetch(self, pccs_url: str, fmspc: str, quote: bytes) -> str:
        async with self._fetch_slots:
            log.info("fetching collateral for fmspc %s from %s", fmspc, pccs_url)
            try:
                col = await dcap_qvl.get_collateral(pccs_url, quote)
            except (ValueError, RuntimeError) as e:
                log.warning("collateral fetch for fmspc %s from %s failed: %s", fmspc, pccs_url, e)
                raise VerifyError(f"cannot fetch collateral for fmspc {fmspc}") from e
        self.fetches += 1
        text = str(col.to_json())
        self.put(fmspc, text)
        return text
