"""quote verification: dcap-qvl under a policy that fails closed.

dcap-qvl checks the signatures (TCB info, QE identity, PCK chain to the given root with CRLs, QE
report, QE hash binding, ISV signature) and matches the platform TCB level. On top of it:
* the TCB status must be in the policy's allowed set (default: UpToDate only), and every
  advisory must be allowed when the policy lists advisories;
* debug TDs and TDs with a non-zero MR_SIGNER_SEAM are refused;
* collateral whose TCB info was issued longer ago than the policy's maximum age is refused;
* a platform whose TCB is below every level of the TCB info gets the status
  ``TcbNotSupported`` (Intel's QVL: TCB_NOT_SUPPORTED) — dcap-qvl reports "no matching TCB
  level", which it only reaches after every signature check passed.

A simulated quote is accepted only when the caller passes the mock root explicitly; there is no
switch that skips verification.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dcap_qvl

from .errors import ParseError, VerifyError
from .quote import Quote, parse_quote

log = logging.getLogger(__name__)

STATUS_NOT_SUPPORTED = "TcbNotSupported"
_NO_MATCHING_LEVEL = "No matching TCB level found"


@dataclass(frozen=True)
class VerificationPolicy:
    allowed_tcb_statuses: frozenset[str] = frozenset({"UpToDate"})
    #: None: any advisory is fine once the status is allowed; else every advisory must be listed
    allowed_advisory_ids: frozenset[str] | None = None
    allow_debug: bool = False
    max_collateral_age_seconds: int | None = None

    @classmethod
    def from_config(cls, obj: dict[str, Any]) -> VerificationPolicy:
        adv = obj.get("allowed_advisory_ids")
        return cls(
            allowed_tcb_statuses=frozenset(obj.get("allowed_tcb_statuses", ["UpToDate"])),
            allowed_advisory_ids=None if adv is None else frozenset(adv),
            allow_debug=bool(obj.get("allow_debug", False)),
            max_collateral_age_seconds=obj.get("max_collateral_age_seconds"),
        )


@dataclass(frozen=True)
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
    try:
        return dcap_qvl.QuoteCollateralV3.from_json(collateral)
    except ValueError as e:
        raise VerifyError(f"invalid collateral: {e}") from e


def _issue_date(collateral: Any) -> int | None:
    try:
        issue = json.loads(collateral.tcb_info)["issueDate"]
        return int(dt.datetime.fromisoformat(issue.replace("Z", "+00:00")).timestamp())
    except (ValueError, KeyError, TypeError):
        return None


def verify_quote(
    quote_bytes: bytes,
    collateral: Any,
    *,
    policy: VerificationPolicy | None = None,
    root_ca_der: bytes | None = None,
    now: int | None = None,
) -> VerifiedQuote:
    """verify a quote under `policy`; raises VerifyError naming why it is refused."""
    policy = policy or VerificationPolicy()
    now = int(time.time()) if now is None else now
    try:
        quote = parse_quote(quote_bytes)
    except ParseError as e:
        raise VerifyError(f"malformed quote: {e}") from e
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
    advisories = tuple(str(a) for a in report.advisory_ids)
    if status not in policy.allowed_tcb_statuses:
        adv = f" (advisories: {', '.join(advisories)})" if advisories else ""
        raise VerifyError(f"tcb status {status} is not allowed{adv}")
    if policy.allowed_advisory_ids is not None:
        bad = [a for a in advisories if a not in policy.allowed_advisory_ids]
        if bad:
            raise VerifyError(f"advisories not allowed: {', '.join(bad)}")
    report_td = quote.td_report
    if report_td is not None:
        if report_td.is_debug and not policy.allow_debug:
            raise VerifyError("debug td refused")
        if any(report_td.mr_signer_seam):
            raise VerifyError("td refused: mr_signer_seam is not zero")
    fmspc = ""
    with contextlib.suppress(ValueError):
        fmspc = dcap_qvl.parse_quote(quote_bytes).fmspc()
    return VerifiedQuote(status, advisories, bytes(report.ppid), quote, fmspc)


class CollateralCache:
    """collateral by FMSPC: in memory, optionally on disk, fetched from a PCCS when missing
    or past its nextUpdate."""

    def __init__(self, pccs_url: str | None = None, cache_dir: Path | None = None) -> None:
        self.pccs_url = pccs_url
        self.cache_dir = cache_dir
        self._mem: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self.fetches = 0

    @staticmethod
    def _fmspc(quote: bytes) -> str:
        try:
            return str(dcap_qvl.parse_quote(quote).fmspc()).upper()
        except ValueError as e:
            raise VerifyError(f"cannot read the fmspc of the quote: {e}") from e

    @staticmethod
    def _fresh(collateral_json: str, now: int) -> bool:
        try:
            tcb = json.loads(json.loads(collateral_json)["tcb_info"])
            nxt = dt.datetime.fromisoformat(tcb["nextUpdate"].replace("Z", "+00:00"))
        except (ValueError, KeyError, TypeError):
            return False
        return now < nxt.timestamp()

    def put(self, fmspc: str, collateral_json: str) -> None:
        self._mem[fmspc.upper()] = collateral_json
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            (self.cache_dir / f"{fmspc.upper()}.json").write_text(collateral_json)

    def seed_from_file(self, quote: bytes, path: Path) -> None:
        self.put(self._fmspc(quote), path.read_text())

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

    async def get(self, quote: bytes, now: int | None = None) -> str:
        now = int(time.time()) if now is None else now
        fmspc = self._fmspc(quote)
        async with self._lock:
            hit = self.cached(fmspc, now)
            if hit is not None:
                return hit
            if not self.pccs_url:
                raise VerifyError(f"no collateral for fmspc {fmspc} and no pccs url configured")
            log.info("fetching collateral for fmspc %s from %s", fmspc, self.pccs_url)
            try:
                col = await dcap_qvl.get_collateral(self.pccs_url, quote)
            except (ValueError, RuntimeError) as e:
                raise VerifyError(f"cannot fetch collateral from {self.pccs_url}: {e}") from e
            self.fetches += 1
            text = str(col.to_json())
            self.put(fmspc, text)
            return text
