"""Cloudflare's v4 DNS API, as upstream's certbot uses it (gateway notes §5.3).

* zone: ``GET {api}/zones?page=N&per_page=50`` over every page (``result_info.total_pages``,
  at most :data:`MAX_ZONE_PAGES`); the zone is the longest suffix of the domain (``*.``
  stripped, lower-case) that names one, else "no matching zone found for base_domain";
* create: ``POST {api}/zones/{zone}/dns_records`` with a TXT ``content`` and ``ttl``, or a CAA
  ``data{flags,tag,value}``; the record id is ``result.id``;
* list: ``GET .../dns_records?name=<fqdn>&type=<t>&page=N&per_page=100`` for up to 19 pages,
  kept when the name matches exactly (no case, no trailing dot);
* delete: ``DELETE .../dns_records/{id}``.

Every call carries ``Authorization: Bearer <token>``. A non-2xx answer, or one whose envelope
says ``success: false``, is a :class:`DnsProviderError` with the method, the path and the
answer's body (cut at :data:`MAX_ERROR_BODY`); the token is never in a message.
"""

from __future__ import annotations

import re
from typing import Any

import httpx

from pydstack.types import jsonlimits

from .dns01 import CAA, TXT, DnsRecord, same_name
from .errors import DnsProviderError
from .model import CLOUDFLARE_API, check_url

MAX_ZONE_PAGES = 200
MAX_RECORD_PAGES = 19
MAX_ERROR_BODY = 1024
MAX_BODY = 8 << 20
TIMEOUT = 30.0
USER_AGENT = "dstack-certbot/0.1"
_RECORD_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class CloudflareDns:
    """the DNS records of the Cloudflare zone that holds `domain`."""

    def __init__(
        self,
        api_token: str,
        domain: str,
        *,
        api_url: str | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.api = check_url(api_url or CLOUDFLARE_API, "cf_api_url")
        self.domain = domain.strip().rstrip(".").lower().removeprefix("*.")
        self._client = client or httpx.AsyncClient(timeout=TIMEOUT)
        self._headers = {"authorization": f"Bearer {api_token}", "user-agent": USER_AGENT}
        self._zone_id: str | None = None

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        url = self.api + path
        try:
            resp = await self._client.request(
                method, url, params=params, json=body, headers=self._headers
            )
        except httpx.HTTPError as e:
            raise DnsProviderError(f"cloudflare api {method} {path}: {type(e).__name__}") from e
        text = resp.content[:MAX_BODY].decode("utf-8", "replace")
        if not resp.is_success:
            raise DnsProviderError(
                f"cloudflare api {method} {path}: {resp.status_code}: {text[:MAX_ERROR_BODY]}"
            )
        try:
            obj = jsonlimits.loads(text, max_bytes=MAX_BODY)
        except ValueError as e:
            raise DnsProviderError(f"cloudflare api {method} {path}: answer is not json") from e
        if not isinstance(obj, dict) or obj.get("success") is False:
            raise DnsProviderError(
                f"cloudflare api {method} {path}: refused: {text[:MAX_ERROR_BODY]}"
            )
        return obj

    @staticmethod
    def _pages(obj: dict[str, Any]) -> int:
        info = obj.get("result_info")
        pages = info.get("total_pages") if isinstance(info, dict) else None
        return pages if isinstance(pages, int) and not isinstance(pages, bool) else 1

    async def zone_id(self) -> str:
        """the id of the zone with the longest name that is a suffix of the domain."""
        if self._zone_id is not None:
            return self._zone_id
        best: tuple[int, str] | None = None
        page, pages = 1, 1
        while page <= pages and page <= MAX_ZONE_PAGES:
            obj = await self._call("GET", "/zones", params={"page": page, "per_page": 50})
            for zone in obj.get("result") or []:
                if not isinstance(zone, dict):
                    continue
                name, zid = zone.get("name"), zone.get("id")
                if not isinstance(name, str) or not isinstance(zid, str):
                    continue
                name = name.rstrip(".").lower()
                if (self.domain == name or self.domain.endswith("." + name)) and (
                    best is None or len(name) > best[0]
                ):
                    best = (len(name), zid)
            pages = self._pages(obj)
            page += 1
        if best is None:
            raise DnsProviderError(f"no matching zone found for base_domain {self.domain}")
        self._zone_id = best[1]
        return best[1]

    async def check(self) -> None:
        await self.zone_id()

    async def _create(self, body: dict[str, Any]) -> str:
        zid = await self.zone_id()
        obj = await self._call("POST", f"/zones/{zid}/dns_records", body=body)
        result = obj.get("result")
        rid = result.get("id") if isinstance(result, dict) else None
        if not isinstance(rid, str) or not rid:
            raise DnsProviderError("cloudflare api: created record has no id")
        return rid

    async def add_txt(self, fqdn: str, value: str, ttl: int) -> str:
        return await self._create({"type": TXT, "name": fqdn, "content": value, "ttl": ttl})

    async def add_caa(self, name: str, flags: int, tag: str, value: str) -> str:
        data = {"flags": flags, "tag": tag, "value": value}
        return await self._create({"type": CAA, "name": name, "data": data})

    async def list_records(self, fqdn: str, rtype: str) -> list[DnsRecord]:
        zid = await self.zone_id()
        out: list[DnsRecord] = []
        page, pages = 1, 1
        while page <= pages and page <= MAX_RECORD_PAGES:
            params = {"name": fqdn, "type": rtype, "page": page, "per_page": 100}
            obj = await self._call("GET", f"/zones/{zid}/dns_records", params=params)
            for rec in obj.get("result") or []:
                if not isinstance(rec, dict):
                    continue
                rid, name, typ = rec.get("id"), rec.get("name"), rec.get("type")
                content = rec.get("content", "")
                if not (isinstance(rid, str) and isinstance(name, str) and isinstance(typ, str)):
                    continue
                if typ == rtype and same_name(name, fqdn) and isinstance(content, str):
                    out.append(DnsRecord(rid, name, typ, content))
            pages = self._pages(obj)
            page += 1
        return out

    async def delete_record(self, record_id: str) -> None:
        if not _RECORD_ID.fullmatch(record_id):
            raise DnsProviderError("cloudflare record id must be 1-64 letters, digits, - or _")
        zid = await self.zone_id()
        await self._call("DELETE", f"/zones/{zid}/dns_records/{record_id}")
