"""the gateway's attested key history (``AcmeInfo``), fetched and verified (gateway notes §6).

:func:`fetch_acme_info` reads the JSON from the gateway's special path
(``https://gateway.<base_domain>[:port]/.dstack/acme-info``, a GET) or its RPC
(``.../prpc/AcmeInfo``, a POST in JSON mode); :func:`parse_acme_info` takes each
``quoted_hist_keys[i].public_key`` as hex with or without ``0x`` (the current gateway's prpc
JSON carries the prefix, older monitors expected none).

:func:`verified_keys` keeps a key only when its evidence verifies — through the project's
evidence path (:class:`LocalKeyVerifier`, an :class:`~pydstack.attest.evidence.EvidenceVerifier`)
or a dstack-verifier's ``/verify`` (:class:`RemoteKeyVerifier`) — with ``is_valid``, the report
data ``sha512("zt-cert:" || public_key)`` and an app identity. Keys whose evidence fails are
dropped with the reason; when there are keys and none verifies it is an error (fail closed: the
monitor then cannot tell attested from unattested certificates).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from pydstack.attest.evidence import EvidenceVerifier
from pydstack.types import jsonlimits
from pydstack.types.netaddr import parse_port

from .attest import cert_report_data
from .errors import CertbotError, CertbotInputError

log = logging.getLogger(__name__)

MAX_INFO = 32 << 20
MAX_KEYS = 10_000
MAX_KEY = 4096


@dataclass(frozen=True)
class HistKey:
    public_key: bytes
    quote: str
    attestation: str


def _unhex(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > 2 * MAX_KEY + 2:
        raise CertbotInputError(f"{what} must be a hex string")
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError as e:
        raise CertbotInputError(f"{what} is not hex") from e


def parse_acme_info(obj: Any) -> list[HistKey]:
    """the history of an AcmeInfo JSON object; CertbotInputError for another shape."""
    if not isinstance(obj, dict):
        raise CertbotInputError("acme info must be a json object")
    keys = obj.get("quoted_hist_keys", [])
    if not isinstance(keys, list):
        raise CertbotInputError("quoted_hist_keys must be a list")
    if len(keys) > MAX_KEYS:
        raise CertbotInputError(f"acme info has more than {MAX_KEYS} keys")
    out = []
    for i, k in enumerate(keys):
        if not isinstance(k, dict):
            raise CertbotInputError(f"quoted_hist_keys[{i}] must be an object")
        quote, att = k.get("quote", ""), k.get("attestation", "")
        if not isinstance(quote, str) or not isinstance(att, str):
            raise CertbotInputError(f"quoted_hist_keys[{i}] quote and attestation are strings")
        out.append(
            HistKey(_unhex(k.get("public_key"), f"quoted_hist_keys[{i}].public_key"), quote, att)
        )
    return out


def acme_info_url(gateway: str) -> str:
    """upstream's ``--gateway base_domain[:port]`` as the special path URL; a full URL as is."""
    if gateway.startswith(("http://", "https://")):
        return gateway
    host, _, port = gateway.partition(":")
    if not host or (port and parse_port(port) is None):
        raise CertbotInputError(f"gateway {gateway!r} must be base_domain[:port] or a url")
    return f"https://gateway.{host}{':' + port if port else ''}/.dstack/acme-info"


async def fetch_acme_info(client: httpx.AsyncClient, url: str) -> Any:
    """the decoded AcmeInfo JSON at `url`; CertbotError when it cannot be had."""
    try:
        if "/prpc/" in url:
            target = (
                url
                if "json" in url.partition("?")[2]
                else url + ("&" if "?" in url else "?") + "json"
            )
            resp = await client.post(target, json={})
        else:
            resp = await client.get(url)
    except httpx.HTTPError as e:
        raise CertbotError(f"cannot fetch acme info from {url}: {type(e).__name__}: {e}") from e
    if not resp.is_success:
        raise CertbotError(f"acme info from {url}: http {resp.status_code}")
    try:
        return jsonlimits.loads(resp.content, max_bytes=MAX_INFO)
    except ValueError as e:
        raise CertbotError(f"acme info from {url} is not json: {e}") from e


def _request(key: HistKey) -> dict[str, Any]:
    """what a verifier takes: the GetQuote answer, or the versioned attestation alone."""
    if key.quote:
        obj = jsonlimits.loads(key.quote, max_bytes=MAX_INFO)
        if not isinstance(obj, dict):
            raise CertbotInputError("quote must be a json object")
        return {k: obj[k] for k in ("quote", "event_log", "vm_config") if k in obj}
    if key.attestation:
        return {"attestation": key.attestation.removeprefix("0x")}
    raise CertbotInputError("key has neither quote nor attestation")


class KeyVerifier(Protocol):
    async def verify(self, key: HistKey) -> str | None:
        """None when `key`'s evidence verifies and binds it; else the reason."""
        ...


def _check(
    valid: bool, report_data: str | None, has_app: bool, reason: Any, key: bytes
) -> str | None:
    if not valid:
        return f"evidence does not verify: {reason}"
    if report_data != cert_report_data(key).hex():
        return "report data is not sha512(zt-cert: || public key)"
    if not has_app:
        return "evidence has no app identity"
    return None


class LocalKeyVerifier:
    """:class:`KeyVerifier` on the project's evidence path."""

    def __init__(self, verifier: EvidenceVerifier) -> None:
        self.verifier = verifier

    async def verify(self, key: HistKey) -> str | None:
        try:
            body = _request(key)
        except (CertbotInputError, ValueError) as e:
            return f"malformed evidence: {e}"
        v = await self.verifier.verify_request(body)
        rd = v.report_data.hex() if v.report_data is not None else None
        return _check(v.is_valid, rd, v.app_info is not None, v.reason, key.public_key)


class RemoteKeyVerifier:
    """:class:`KeyVerifier` on a dstack-verifier's ``POST /verify``."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self.client = client
        self.url = url.rstrip("/") + "/verify"

    async def verify(self, key: HistKey) -> str | None:
        try:
            body = _request(key)
        except (CertbotInputError, ValueError) as e:
            return f"malformed evidence: {e}"
        try:
            resp = await self.client.post(self.url, json=body)
            out = jsonlimits.loads(resp.content, max_bytes=MAX_INFO)
        except (httpx.HTTPError, ValueError) as e:
            raise CertbotError(f"verifier {self.url} failed: {type(e).__name__}") from e
        if not isinstance(out, dict) or not isinstance(out.get("details"), dict):
            raise CertbotError(
                f"verifier {self.url} answered http {resp.status_code} without details"
            )
        d = out["details"]
        rd = d.get("report_data") if isinstance(d.get("report_data"), str) else None
        return _check(
            out.get("is_valid") is True,
            rd,
            bool(d.get("app_info")),
            out.get("reason"),
            key.public_key,
        )


class CachingKeyVerifier:
    """a :class:`KeyVerifier` that asks `inner` once per key and evidence."""

    def __init__(self, inner: KeyVerifier) -> None:
        self.inner = inner
        self._verdicts: dict[tuple[bytes, str, str], str | None] = {}

    async def verify(self, key: HistKey) -> str | None:
        k = (key.public_key, key.quote, key.attestation)
        if k not in self._verdicts:
            self._verdicts[k] = await self.inner.verify(key)
        return self._verdicts[k]


async def verified_keys(keys: list[HistKey], verifier: KeyVerifier) -> set[bytes]:
    """the public keys (SPKI DER) whose evidence verifies; CertbotError when some exist and
    none does."""
    good: set[bytes] = set()
    for key in keys:
        why = await verifier.verify(key)
        if why is None:
            good.add(key.public_key)
        else:
            log.error("attested key %s… rejected: %s", key.public_key.hex()[:16], why)
    if keys and not good:
        raise CertbotError("none of the gateway's attested keys verifies")
    return good
