"""the lazy policy fetch against a real HTTP agent on loopback."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from pydstack.gateway.config import PortPolicyFetch
from pydstack.gateway.policy import PortPolicy
from pydstack.gateway.policy_fetch import PolicyFetcher
from pydstack.gateway.routes import Instance, RouteTable


async def test_fetch_from_an_agent_info_endpoint() -> None:
    compose = {"port_policy": {"restrict_mode": True, "ports": [{"port": 8080, "pp": True}]}}
    seen: list[str] = []

    async def info(request: web.Request) -> web.Response:
        seen.append(request.path_qs)
        return web.json_response(
            {"app_id": "x", "tcb_info": json.dumps({"app_compose": json.dumps(compose)})}
        )

    app = web.Application()
    app.router.add_post("/prpc/Info", info)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    table = RouteTable()
    table.upsert(Instance("i1", "app", "127.0.0.1"))
    fetcher = PolicyFetcher(table, PortPolicyFetch(), port)
    try:
        fetcher("i1")
        await asyncio.gather(*fetcher.in_flight.values())
        assert seen == ["/prpc/Info?json"]
        assert table.get("i1").reported_policy == PortPolicy(True, {8080: True})  # type: ignore[union-attr]
    finally:
        await runner.cleanup()
