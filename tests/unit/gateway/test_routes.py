"""the route table: instance before app, top-N by handshake recency with its cache, health,
fail-closed policy, per-app limits, conflicts, snapshots, and no cross-app routing."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydstack.gateway.policy import OPEN_POLICY, PortPolicy
from pydstack.gateway.routes import (
    Instance,
    RouteConflictError,
    RouteError,
    RouteSettings,
    RouteTable,
)

NOW = 1_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def inst(iid: str, app: str, n: int, policy: PortPolicy | None = OPEN_POLICY) -> Instance:
    return Instance(iid, app, f"10.0.0.{n}", public_key=f"key-{iid}", reported_policy=policy)


def table(**kw: float) -> tuple[RouteTable, Clock]:
    clock = Clock()
    t = RouteTable(RouteSettings(**kw), clock=clock, wall_clock=lambda: NOW)  # type: ignore[arg-type]
    return t, clock


def test_instance_id_first_then_app_id() -> None:
    t, _ = table()
    t.upsert(inst("i1", "app", 1))
    t.upsert(inst("i2", "app", 2))
    t.set_handshakes({"key-i1": NOW - 5, "key-i2": NOW - 1})
    assert [c.host for c in t.resolve("i1", 80)] == ["10.0.0.1"]
    assert [c.host for c in t.resolve("app", 80)] == ["10.0.0.2", "10.0.0.1"]
    with pytest.raises(RouteError, match="app not found"):
        t.resolve("nobody", 80)


def test_instance_route_needs_no_handshake_but_app_route_does() -> None:
    t, _ = table()
    t.upsert(inst("i1", "app", 1))
    t.set_handshakes({})
    assert t.resolve("i1", 80)[0].host == "10.0.0.1"
    with pytest.raises(RouteError, match="no healthy instance"):
        t.resolve("app", 80)


def test_stale_handshakes_are_unhealthy() -> None:
    t, _ = table(handshake_stale=60)
    t.upsert(inst("old", "app", 1))
    t.upsert(inst("new", "app", 2))
    t.set_handshakes({"key-old": NOW - 61, "key-new": NOW - 59})
    assert [c.instance.instance_id for c in t.resolve("app", 80)] == ["new"]  # type: ignore[union-attr]


def test_top_n_by_recency() -> None:
    t, _ = table(connect_top_n=2)
    for n in range(1, 6):
        t.upsert(inst(f"i{n}", "app", n))
    t.set_handshakes({f"key-i{n}": NOW - 10 * n for n in range(1, 6)})
    assert [c.host for c in t.resolve("app", 80)] == ["10.0.0.1", "10.0.0.2"]


def test_top_n_cache_holds_until_it_expires_or_the_app_changes() -> None:
    t, clock = table(connect_top_n=1, cache_top_n=30)
    t.upsert(inst("a", "app", 1))
    t.upsert(inst("b", "app", 2))
    t.set_handshakes({"key-a": NOW - 1, "key-b": NOW - 2})
    assert t.resolve("app", 80)[0].host == "10.0.0.1"
    # b becomes fresher, but the cached choice holds for 30 s
    t.set_handshakes({"key-a": NOW - 9, "key-b": NOW - 1})
    clock.t = 29
    assert t.resolve("app", 80)[0].host == "10.0.0.1"
    clock.t = 31
    assert t.resolve("app", 80)[0].host == "10.0.0.2"
    # adding an instance drops the app's cache at once
    t.set_handshakes({"key-a": NOW - 9, "key-b": NOW - 1, "key-c": NOW})
    t.upsert(inst("c", "app", 3))
    assert t.resolve("app", 80)[0].host == "10.0.0.3"
    # removing the cached instance does too
    t.remove("c")
    assert t.resolve("app", 80)[0].host == "10.0.0.2"


def test_unreadable_handshakes_fall_back_to_random() -> None:
    t = RouteTable(RouteSettings(), rng=random.Random(1))
    t.upsert(inst("a", "app", 1))
    t.upsert(inst("b", "app", 2))
    t.set_handshakes(None)
    seen = {t.resolve("app", 80)[0].host for _ in range(50)}
    assert seen == {"10.0.0.1", "10.0.0.2"}


def test_connect_top_n_zero_picks_one_healthy() -> None:
    t, _ = table(connect_top_n=0)
    t.upsert(inst("a", "app", 1))
    t.upsert(inst("b", "app", 2))
    t.set_handshakes({"key-a": NOW - 1, "key-b": 0})
    for _ in range(20):
        assert [c.host for c in t.resolve("app", 80)] == ["10.0.0.1"]


def test_unknown_policy_fails_closed_and_asks_for_a_fetch() -> None:
    t, _ = table()
    asked: list[str] = []
    t.on_policy_missing = asked.append
    t.upsert(inst("i1", "app", 1, policy=None))
    with pytest.raises(RouteError, match="port 80 denied by app port policy"):
        t.resolve("i1", 80)
    assert asked == ["i1"]
    t.set_reported_policy("i1", PortPolicy(True, {80: True}))
    [c] = t.resolve("i1", 80)
    assert c.pp is True
    with pytest.raises(RouteError, match="port 81 denied"):
        t.resolve("i1", 81)


def test_admin_override_beats_the_reported_policy() -> None:
    t, _ = table()
    t.upsert(inst("i1", "app", 1))
    t.set_admin_policy("i1", PortPolicy(True, {}))
    with pytest.raises(RouteError, match="denied"):
        t.resolve("i1", 80)
    t.set_admin_policy("i1", None)
    assert t.resolve("i1", 80)
    with pytest.raises(RouteError, match="instance not found"):
        t.set_admin_policy("nope", None)


def test_denied_candidates_are_filtered_out() -> None:
    t, _ = table()
    t.upsert(inst("a", "app", 1, policy=PortPolicy(True, {})))
    t.upsert(inst("b", "app", 2))
    t.set_handshakes({"key-a": NOW, "key-b": NOW - 1})
    assert [c.host for c in t.resolve("app", 80)] == ["10.0.0.2"]


def test_per_app_limit_counts_the_candidates_live_connections() -> None:
    t, _ = table(max_connections_per_app=2)
    t.upsert(inst("a", "app", 1))
    t.set_handshakes({"key-a": NOW})
    t.conn_opened("a")
    t.resolve("app", 80)
    t.remote_counts = {"a": 1}
    with pytest.raises(RouteError, match="app connection limit exceeded: 2/2"):
        t.resolve("app", 80)
    t.conn_closed("a")
    assert t.resolve("app", 80)
    assert t.connections("a") == 1 and t.local_counts() == {}


def test_limit_zero_is_unlimited() -> None:
    t, _ = table(max_connections_per_app=0)
    t.upsert(inst("a", "app", 1))
    for _ in range(5000):
        t.conn_opened("a")
    assert t.resolve("a", 80)


def test_conflicts_change_nothing() -> None:
    t, _ = table()
    t.upsert(inst("i1", "app-a", 1))
    with pytest.raises(RouteConflictError, match="registered to another app"):
        t.upsert(inst("i1", "app-b", 9))
    with pytest.raises(RouteConflictError, match="public key is used by another instance"):
        t.upsert(Instance("i2", "app-a", "10.0.0.2", public_key="key-i1"))
    with pytest.raises(RouteConflictError, match="must not be empty"):
        t.upsert(Instance("", "app-a", "10.0.0.3"))
    assert [(i.instance_id, i.app_id, i.ip) for i in t.instances()] == [("i1", "app-a", "10.0.0.1")]
    assert t.get("i2") is None


def test_key_rotation_frees_the_old_key() -> None:
    t, _ = table()
    t.upsert(inst("i1", "app", 1))
    t.upsert(Instance("i1", "app", "10.0.0.1", public_key="new"))
    t.upsert(Instance("i2", "app", "10.0.0.2", public_key="key-i1"))
    assert t.get("i2") is not None


def test_snapshot_round_trip() -> None:
    t, _ = table()
    t.upsert(inst("i1", "app", 1, policy=PortPolicy(True, {8080: True})))
    t.upsert(inst("i2", "other", 2, policy=None))
    t.set_admin_policy("i2", PortPolicy(False, {}))
    t.set_handshakes({"key-i1": NOW - 3})
    copy, _ = table()
    copy.upsert(inst("gone", "app", 9))
    copy.load_snapshot(t.snapshot())
    assert sorted(copy.instances(), key=lambda i: i.instance_id) == sorted(
        t.instances(), key=lambda i: i.instance_id
    )
    assert copy.get("gone") is None
    assert copy.handshake_age(copy.get("i1")) == 3  # type: ignore[arg-type]
    # a key moving between instances in one snapshot is not a conflict
    t.remove("i1")
    t.upsert(Instance("i3", "app", "10.0.0.3", public_key="key-i1", reported_policy=OPEN_POLICY))
    copy.load_snapshot(t.snapshot())
    assert copy.get("i3") is not None and copy.get("i1") is None


registrations = st.lists(
    st.tuples(
        st.sampled_from([f"i{n}" for n in range(8)] + ["a0", "a1"]),
        st.sampled_from(["a0", "a1", "a2", "i3"]),
        st.sampled_from([f"k{n}" for n in range(6)]),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(registrations, st.lists(st.tuples(st.booleans(), st.integers(0, 9)), max_size=10))
def test_an_id_never_reaches_another_apps_instance(
    regs: list[tuple[str, str, str]], removals: list[tuple[bool, int]]
) -> None:
    """random registrations (conflicting ones refused), removals and handshakes: what an id
    resolves to is the instance with that id or instances of the app with that id, and every
    instance keeps the app it was first registered with."""
    t, _ = table(connect_top_n=3)
    owner: dict[str, str] = {}
    for n, (iid, app, key) in enumerate(regs):
        try:
            t.upsert(Instance(iid, app, f"10.1.0.{n}", public_key=key, reported_policy=OPEN_POLICY))
        except RouteConflictError:
            continue
        owner.setdefault(iid, app)
        assert owner[iid] == app
    for remove, n in removals:
        if remove:
            gone = t.remove(f"i{n}")
            if gone is not None:
                owner.pop(gone.instance_id, None)
    t.set_handshakes({f"k{n}": NOW - n for n in range(6)})
    for target in {r[0] for r in regs} | {r[1] for r in regs} | {"zz"}:
        try:
            got = t.resolve(target, 80)
        except RouteError:
            continue
        ids = {c.instance.instance_id for c in got if c.instance}
        by_instance = t.get(target)
        if by_instance is not None:
            assert ids == {target}
        else:
            for iid in ids:
                assert t.get(iid).app_id == target  # type: ignore[union-attr]
                assert owner[iid] == target
