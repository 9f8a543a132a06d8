"""the lazy port-policy fetch: de-duplicated, retried with backoff, malformed is permanent."""

from __future__ import annotations

import asyncio
import json

from pydstack.gateway.config import PortPolicyFetch
from pydstack.gateway.policy import PortPolicy
from pydstack.gateway.policy_fetch import PolicyFetcher
from pydstack.gateway.routes import Instance, RouteTable

GOOD = {
    "tcb_info": json.dumps(
        {
            "app_compose": json.dumps(
                {"port_policy": {"restrict_mode": True, "ports": [{"port": 80}]}}
            )
        }
    )
}


def setup(answers: list[object]) -> tuple[RouteTable, PolicyFetcher, list[tuple], list[float]]:
    table = RouteTable()
    table.upsert(Instance("i1", "app", "10.0.0.2", public_key="k"))
    calls: list[tuple] = []
    sleeps: list[float] = []
    gate = asyncio.Event()

    async def get_info(ip: str, port: int, timeout: float):
        calls.append((ip, port))
        await gate.wait()
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def sleep(d: float) -> None:
        sleeps.append(d)

    fetcher = PolicyFetcher(
        table,
        PortPolicyFetch(timeout=5, max_retries=3, backoff_initial=1, backoff_max=3),
        8090,
        get_info=get_info,
        sleep=sleep,
    )
    fetcher.gate = gate  # type: ignore[attr-defined]
    return table, fetcher, calls, sleeps


async def test_one_fetch_at_a_time_and_the_policy_lands_in_the_table() -> None:
    table, fetcher, calls, _ = setup([GOOD])
    fetched: list[str] = []
    fetcher.on_fetched = lambda iid, p: fetched.append(iid)
    fetcher("i1")
    fetcher("i1")
    fetcher("unknown-instance")
    await asyncio.sleep(0)
    fetcher.gate.set()  # type: ignore[attr-defined]
    await asyncio.gather(*fetcher.in_flight.values())
    assert calls == [("10.0.0.2", 8090)]
    assert table.get("i1").reported_policy == PortPolicy(True, {80: False})  # type: ignore[union-attr]
    assert fetched == ["i1"]


async def test_retries_with_doubling_backoff_then_gives_up() -> None:
    table, fetcher, calls, sleeps = setup([OSError("down")] * 4)
    fetcher.gate.set()  # type: ignore[attr-defined]
    fetcher("i1")
    await asyncio.gather(*fetcher.in_flight.values())
    assert len(calls) == 4 and sleeps == [1, 2, 3]
    assert table.get("i1").reported_policy is None  # type: ignore[union-attr]


async def test_retry_then_success() -> None:
    table, fetcher, calls, sleeps = setup([TimeoutError(), GOOD])
    fetcher.gate.set()  # type: ignore[attr-defined]
    fetcher("i1")
    await asyncio.gather(*fetcher.in_flight.values())
    assert len(calls) == 2 and sleeps == [1]
    assert table.get("i1").reported_policy is not None  # type: ignore[union-attr]


async def test_malformed_answer_is_permanent() -> None:
    table, fetcher, calls, sleeps = setup([{"tcb_info": "{broken"}, GOOD])
    fetcher.gate.set()  # type: ignore[attr-defined]
    fetcher("i1")
    await asyncio.gather(*fetcher.in_flight.values())
    assert len(calls) == 1 and sleeps == []
    assert table.get("i1").reported_policy is None  # type: ignore[union-attr]


async def test_an_unexpected_error_is_logged_and_the_instance_stays_denied(caplog) -> None:
    """before jsonlimits, a deeply nested tcb_info raised RecursionError out of the fetch task
    ("task exception was never retrieved"); whatever escapes the parsers now ends the same way
    as a malformed answer, with the traceback in the log."""
    table, fetcher, calls, _ = setup([RuntimeError("a bug"), GOOD])
    fetcher.gate.set()  # type: ignore[attr-defined]
    fetcher("i1")
    tasks = list(fetcher.in_flight.values())
    await asyncio.gather(*tasks)
    assert all(t.exception() is None for t in tasks)
    assert len(calls) == 1 and table.get("i1").reported_policy is None  # type: ignore[union-attr]
    assert "failed unexpectedly" in caplog.text and "a bug" in caplog.text
