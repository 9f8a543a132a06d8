"""the lazy port-policy fetch (§2.5): when a connection is refused because an instance has no
policy (a legacy CVM that registered without one), ask its guest agent's ``Info`` over the
WireGuard address and remember the answer.

:class:`PolicyFetcher` is the control plane's ``RouteTable.on_policy_missing``: one fetch per
instance at a time (later requests while one runs are dropped), each try bounded by
``port_policy_fetch.timeout``, up to ``max_retries`` retries with a backoff from
``backoff_initial`` doubling to ``backoff_max``. A malformed answer
(:class:`~.policy.PortPolicyError`) is permanent: no retry, the instance stays denied. On success
the policy is set in the table and ``on_fetched`` runs (to persist it and publish to workers).
The agent is called as ``POST http://<ip>:<agent_port>/prpc/Info?json`` with ``{}``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp

from pydstack.types.capped import read_capped_stream
from pydstack.types.jsonlimits import load_object

from .config import PortPolicyFetch
from .policy import PortPolicy, PortPolicyError, policy_from_agent_info
from .routes import RouteTable

log = logging.getLogger(__name__)

#: the most bytes of an agent's Info answer read
MAX_INFO_BYTES = 4 << 20

GetInfo = Callable[[str, int, float], Awaitable[Mapping[str, Any]]]


async def agent_info(ip: str, port: int, timeout: float) -> Mapping[str, Any]:
    """the JSON ``Info`` of the guest agent at ip:port (OSError/TimeoutError/ValueError)."""
    url = f"http://{ip}:{port}/prpc/Info?json"
    t = aiohttp.ClientTimeout(total=timeout)
    async with (
        aiohttp.ClientSession(timeout=t) as s,
        s.post(url, data=b"{}", headers={"content-type": "application/json"}) as r,
    ):
        if r.status != 200:
            raise OSError(f"agent info answered {r.status}")
        body = await read_capped_stream(r.content, MAX_INFO_BYTES)
        if len(body) > MAX_INFO_BYTES:
            raise PortPolicyError("agent info answer too large")
        return load_object(body, "agent info", max_bytes=MAX_INFO_BYTES, error=PortPolicyError)


class PolicyFetcher:
    """de-duplicated background fetches of instances' port policies into a route table."""

    def __init__(
        self,
        table: RouteTable,
        settings: PortPolicyFetch,
        agent_port: int,
        *,
        get_info: GetInfo = agent_info,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_fetched: Callable[[str, PortPolicy], None] | None = None,
    ) -> None:
        self.table = table
        self.settings = settings
        self.agent_port = agent_port
        self._get_info = get_info
        self._sleep = sleep
        self.on_fetched = on_fetched
        self.in_flight: dict[str, asyncio.Task[None]] = {}

    def __call__(self, instance_id: str) -> None:
        """queue a fetch for the instance (no-op while one runs or when it is unknown)."""
        if instance_id in self.in_flight or self.table.get(instance_id) is None:
            return
        task = asyncio.get_running_loop().create_task(self._fetch(instance_id))
        self.in_flight[instance_id] = task
        task.add_done_callback(lambda _t: self.in_flight.pop(instance_id, None))

    async def _fetch(self, instance_id: str) -> None:
        s = self.settings
        delay = s.backoff_initial
        for attempt in range(s.max_retries + 1):
            inst = self.table.get(instance_id)
            if inst is None or inst.policy()[0] is not None:
                return
            try:
                async with asyncio.timeout(s.timeout):
                    info = await self._get_info(inst.ip, self.agent_port, s.timeout)
                policy = policy_from_agent_info(info)
            except PortPolicyError as e:
                log.warning("port policy of instance %s is malformed: %s", instance_id, e)
                return
            except (OSError, TimeoutError, ValueError, aiohttp.ClientError) as e:
                log.info("port policy fetch %d for %s failed: %s", attempt + 1, instance_id, e)
                if attempt < s.max_retries:
                    await self._sleep(delay)
                    delay = min(delay * 2, s.backoff_max)
                continue
            except Exception:  # a bug: said in the log; the instance stays denied (fail closed)
                log.exception("port policy fetch for %s failed unexpectedly", instance_id)
                return
            if self.table.get(instance_id) is None:
                return
            self.table.set_reported_policy(instance_id, policy)
            if self.on_fetched is not None:
                self.on_fetched(instance_id, policy)
            return
        log.warning("port policy of instance %s could not be fetched", instance_id)
