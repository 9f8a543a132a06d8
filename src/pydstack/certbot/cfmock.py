"""a local stand-in for Cloudflare's v4 DNS API (the endpoints of the gateway notes §5.3, §5.7),
whose records can land in a real DNS server so an ACME server really validates them.

Endpoints, under ``/client/v4``, with Cloudflare's envelope ``{success, errors, messages,
result}``:

* ``GET /zones?page=&per_page=&name=`` and ``GET /zones/<id>`` (zone ids ``mock-zone-<name with
  dashes>``), with ``result_info{page, per_page, count, total_count, total_pages}``;
* ``POST /zones/<id>/dns_records`` (TXT ``content``/``ttl``; CAA ``data{flags, tag, value}``,
  rendered as ``<flags> <tag> "<value>"``; record ids 32 hex digits);
* ``GET /zones/<id>/dns_records?type=&name=&page=&per_page=`` (exact name);
* ``GET`` / ``DELETE /zones/<id>/dns_records/<record id>`` (missing: 404, code 81044).

A bearer token is required (401 without); with `tokens` set, another one is 403. With a
`backend` (e.g. an :class:`~.rfc2136.Rfc2136Dns` on a :class:`~.devdns.DevBind`) every TXT and
CAA change is applied there too, and one the backend refuses is refused here (502) with nothing
kept. `refuse` lets a test reject a record body with a Cloudflare error (400). Bodies are
bounded (64 KiB), names must lie in the zone, pages are capped at 1000 records.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .dns01 import CAA, TXT, DnsProvider, caa_content, same_name
from .errors import DnsProviderError

API = "/client/v4"
MAX_BODY = 64 * 1024
MAX_PER_PAGE = 1000
DEFAULT_ZONES = ("test.local", "example.com", "test0.local", "test1.local", "test2.local")


def zone_id(name: str) -> str:
    return "mock-zone-" + name.replace(".", "-")


@dataclass
class MockRecord:
    id: str
    zone_id: str
    type: str
    name: str
    content: str
    ttl: int
    data: dict[str, Any] | None
    backend_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "zone_id": self.zone_id,
            "type": self.type,
            "name": self.name,
            "content": self.content,
            "ttl": self.ttl,
            "proxied": False,
        }
        if self.data is not None:
            out["data"] = self.data
        return out


def _envelope(
    result: Any, *, info: dict[str, Any] | None = None, status: int = 200
) -> web.Response:
    body: dict[str, Any] = {"success": True, "errors": [], "messages": [], "result": result}
    if info is not None:
        body["result_info"] = info
    return web.json_response(body, status=status)


def _error(status: int, code: int, message: str) -> web.Response:
    body = {"success": False, "errors": [{"code": code, "message": message}], "messages": []}
    return web.json_response(body, status=status, reason=None)


def _page(items: list[Any], request: web.Request, default: int) -> tuple[list[Any], dict[str, Any]]:
    try:
        page = max(1, int(request.query.get("page", "1")))
        per = min(MAX_PER_PAGE, max(1, int(request.query.get("per_page", str(default)))))
    except ValueError as e:
        raise web.HTTPBadRequest(text="page and per_page must be integers") from e
    total = len(items)
    chunk = items[(page - 1) * per : page * per]
    pages = max(1, math.ceil(total / per))
    info = {
        "page": page,
        "per_page": per,
        "count": len(chunk),
        "total_count": total,
        "total_pages": pages,
    }
    return chunk, info


class CfMock:
    """the mock's state and its aiohttp application."""

    def __init__(
        self,
        zones: tuple[str, ...] = DEFAULT_ZONES,
        *,
        tokens: tuple[str, ...] = (),
        backend: DnsProvider | None = None,
    ) -> None:
        self.zones = {zone_id(z): z.lower() for z in zones}
        self.tokens = set(tokens)
        self.backend = backend
        self.records: dict[str, MockRecord] = {}
        self.refuse: Callable[[dict[str, Any]], str | None] | None = None
        self.requests: list[tuple[str, str]] = []
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._auth])
        app.router.add_get(f"{API}/zones", self.list_zones)
        app.router.add_get(f"{API}/zones/{{zone}}", self.get_zone)
        app.router.add_post(f"{API}/zones/{{zone}}/dns_records", self.create)
        app.router.add_get(f"{API}/zones/{{zone}}/dns_records", self.list_records)
        app.router.add_get(f"{API}/zones/{{zone}}/dns_records/{{rid}}", self.get_record)
        app.router.add_delete(f"{API}/zones/{{zone}}/dns_records/{{rid}}", self.delete)
        app.router.add_get("/health", self.health)
        return app

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        if request.path == "/health":
            response: web.StreamResponse = await handler(request)
            return response
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return _error(401, 10000, "authentication error")
        if self.tokens and auth[7:].strip() not in self.tokens:
            return _error(403, 10000, "invalid api token")
        response = await handler(request)
        return response

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """serves on `host`:`port`; the API base URL (``http://host:port/client/v4``)."""
        self._runner = web.AppRunner(self.app())
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname()[1]
        return f"http://{host}:{bound}{API}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def _zone(self, request: web.Request) -> str:
        zid = request.match_info["zone"]
        if zid not in self.zones:
            raise web.HTTPNotFound(
                text='{"success":false,"errors":[{"code":7003,"message":"no such zone"}]}',
                content_type="application/json",
            )
        return zid

    async def list_zones(self, request: web.Request) -> web.Response:
        name = request.query.get("name")
        zones = [
            {"id": zid, "name": z, "status": "active"}
            for zid, z in sorted(self.zones.items(), key=lambda kv: kv[1])
            if name is None or z == name.lower()
        ]
        chunk, info = _page(zones, request, 20)
        return _envelope(chunk, info=info)

    async def get_zone(self, request: web.Request) -> web.Response:
        zid = self._zone(request)
        return _envelope({"id": zid, "name": self.zones[zid], "status": "active"})

    async def create(self, request: web.Request) -> web.Response:
        zid = self._zone(request)
        try:
            body = await request.json()
        except ValueError:
            return _error(400, 9207, "request body is not valid json")
        if not isinstance(body, dict):
            return _error(400, 9207, "request body must be an object")
        rtype, name = body.get("type"), body.get("name")
        if rtype not in (TXT, CAA) or not isinstance(name, str) or not name:
            return _error(400, 9000, "type must be TXT or CAA and name a string")
        zone = self.zones[zid]
        fqdn = name.rstrip(".").lower()
        if not (fqdn == zone or fqdn.endswith("." + zone)):
            return _error(400, 9005, f"name {fqdn} is not in zone {zone}")
        if self.refuse is not None and (why := self.refuse(body)) is not None:
            return _error(400, 9005, why)
        ttl = body.get("ttl", 1)
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= 86400:
            return _error(400, 9021, "ttl must be between 1 and 86400")
        data: dict[str, Any] | None = None
        if rtype == TXT:
            content = body.get("content")
            if not isinstance(content, str) or not 0 < len(content) <= 2048:
                return _error(400, 9009, "content must be a string of 1-2048 characters")
        else:
            data = body.get("data")
            if not isinstance(data, dict):
                return _error(400, 9101, "caa record needs data")
            flags, tag, value = data.get("flags", 0), data.get("tag"), data.get("value")
            if (
                not isinstance(flags, int)
                or not 0 <= flags <= 255
                or tag not in ("issue", "issuewild", "iodef")
                or not isinstance(value, str)
                or len(value) > 1024
            ):
                return _error(400, 9101, "caa data needs flags 0-255, a tag and a value")
            content = caa_content(flags, tag, value)
        rec = MockRecord(secrets.token_hex(16), zid, rtype, fqdn, content, ttl, data)
        if self.backend is not None:
            try:
                if rtype == TXT:
                    rec.backend_id = await self.backend.add_txt(fqdn, content, ttl)
                else:
                    assert data is not None
                    rec.backend_id = await self.backend.add_caa(
                        fqdn, data.get("flags", 0), str(data["tag"]), str(data["value"])
                    )
            except DnsProviderError as e:
                return _error(502, 1000, f"dns backend refused the record: {e}")
        self.records[rec.id] = rec
        return _envelope(rec.to_json())

    async def list_records(self, request: web.Request) -> web.Response:
        zid = self._zone(request)
        rtype, name = request.query.get("type"), request.query.get("name")
        out = [
            r.to_json()
            for r in self.records.values()
            if r.zone_id == zid
            and (rtype is None or r.type == rtype)
            and (name is None or same_name(r.name, name))
        ]
        chunk, info = _page(out, request, 100)
        return _envelope(chunk, info=info)

    def _record(self, request: web.Request, zid: str) -> MockRecord | None:
        rec = self.records.get(request.match_info["rid"])
        return rec if rec is not None and rec.zone_id == zid else None

    async def get_record(self, request: web.Request) -> web.Response:
        rec = self._record(request, self._zone(request))
        if rec is None:
            return _error(404, 81044, "record does not exist")
        return _envelope(rec.to_json())

    async def delete(self, request: web.Request) -> web.Response:
        rec = self._record(request, self._zone(request))
        if rec is None:
            return _error(404, 81044, "record does not exist")
        if self.backend is not None and rec.backend_id is not None:
            try:
                await self.backend.delete_record(rec.backend_id)
            except DnsProviderError as e:
                return _error(502, 1000, f"dns backend refused the deletion: {e}")
        del self.records[rec.id]
        return _envelope({"id": rec.id})


def main(argv: list[str] | None = None) -> int:
    """``python -m pydstack.certbot.cfmock --port P [--zone Z ...] [--token T ...]`` (no DNS
    backend: records are only kept in memory)."""
    ap = argparse.ArgumentParser(description="a local cloudflare v4 dns api stand-in")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--zone", action="append")
    ap.add_argument("--token", action="append", default=[])
    args = ap.parse_args(argv)
    mock = CfMock(tuple(args.zone or DEFAULT_ZONES), tokens=tuple(args.token))

    async def serve() -> None:
        from pydstack.process import stop_signal

        url = await mock.start(args.host, args.port)
        print(f"cloudflare api on {url}", flush=True)
        await stop_signal().wait()
        await mock.stop()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
