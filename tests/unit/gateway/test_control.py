"""the control plane on a real store and route table with a recorded WireGuard: registration and
every refusal of §1.3 (nothing changes on a refusal), re-registration, policies, node status,
restart, recycling, the handshake poller, and a property test: whatever the registrations, a
connection for app A never reaches an instance of app B."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pydstack.errors import DstackError, NotFoundError
from pydstack.gateway.control import (
    NODE_DOWN_MESSAGE,
    GatewayControl,
    NodeIdentity,
    RegistrationRefused,
)
from pydstack.gateway.policy import OPEN_POLICY, PortPolicy
from pydstack.gateway.routes import RouteError, RouteTable
from pydstack.gateway.store import LocalFileStore
from pydstack.gateway.wgconf import (
    IpPoolExhausted,
    WgNetwork,
    generate_private_key,
    public_key_of,
)

KEYS = [public_key_of(generate_private_key()) for _ in range(8)]
PRIVATE = generate_private_key()


class FakeWg:
    def __init__(self) -> None:
        self.applied: list[str] = []
        self.handshakes: dict[str, float] | Exception = {}

    async def apply(self, config: str) -> None:
        self.applied.append(config)

    async def latest_handshakes(self) -> dict[str, float]:
        if isinstance(self.handshakes, Exception):
            raise self.handshakes
        return dict(self.handshakes)


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def node(node_id: int = 1) -> NodeIdentity:
    return NodeIdentity(node_id, "https://gw:8000", public_key_of(PRIVATE), PRIVATE,
                        "10.0.0.1/24", "192.0.2.1:51820", 51820)  # fmt: skip


def make(path, *, crange: str = "10.0.0.0/25", clock: Clock | None = None):
    wg = FakeWg()
    clock = clock or Clock()
    ctl = GatewayControl(
        LocalFileStore(path),
        RouteTable(wall_clock=clock),
        WgNetwork.parse("10.0.0.1/24", ["10.0.0.1/32"], crange),
        node(),
        wg,
        clock=clock,
    )
    return ctl, wg, clock


async def test_a_new_instance_gets_the_first_free_address_and_a_peer(tmp_path) -> None:
    ctl, wg, _ = make(tmp_path)
    await ctl.start()
    a = await ctl.register("app1", "i1", "ch1", KEYS[0], OPEN_POLICY)
    b = await ctl.register("app1", "i2", "ch1", KEYS[1], None)
    assert (a.ip, b.ip) == ("10.0.0.2", "10.0.0.3")
    assert f"PublicKey = {KEYS[0]}\nAllowedIPs = 10.0.0.2/32" in wg.applied[-1]
    assert f"PublicKey = {KEYS[1]}\nAllowedIPs = 10.0.0.3/32" in wg.applied[-1]
    assert [c.host for c in ctl.table.resolve("i1", 80)] == ["10.0.0.2"]
    with pytest.raises(RouteError, match="denied by app port policy"):
        ctl.table.resolve("i2", 80)  # no policy yet: fail closed


async def test_re_registration_keeps_the_address_and_follows_the_key(tmp_path) -> None:
    ctl, wg, clock = make(tmp_path)
    first = await ctl.register("app1", "i1", "ch1", KEYS[0], None)
    applied = len(wg.applied)
    clock.t += 100
    same = await ctl.register("app1", "i1", "ch1", KEYS[0], None)
    assert same.ip == first.ip and same.reg_time == first.reg_time
    assert len(wg.applied) == applied  # nothing changed: no syncconf
    moved = await ctl.register("app1", "i1", "ch1", KEYS[1], None)
    assert moved.ip == first.ip and moved.reg_time == clock.t
    assert KEYS[0] not in wg.applied[-1] and KEYS[1] in wg.applied[-1]
    # the old key is free again for another instance
    other = await ctl.register("app1", "i2", "ch1", KEYS[0], None)
    assert other.ip == "10.0.0.3"


async def test_policies_follow_the_compose_hash_and_the_admin_override_stays(tmp_path) -> None:
    ctl, _, _ = make(tmp_path)
    only_443 = PortPolicy(True, {443: True})
    await ctl.register("app1", "i1", "ch1", KEYS[0], only_443)
    await ctl.set_admin_policy("i1", PortPolicy(True, {22: False}))
    rec = await ctl.register("app1", "i1", "ch1", KEYS[0], None)  # same compose: kept
    assert rec.port_policy == only_443 and rec.port_policy_hash == "ch1"
    rec = await ctl.register("app1", "i1", "ch2", KEYS[0], None)  # upgraded: dropped
    assert rec.port_policy is None and rec.admin_port_policy == PortPolicy(True, {22: False})
    assert ctl.table.get("i1").policy()[0] == PortPolicy(True, {22: False})  # type: ignore[union-attr]
    rec = await ctl.register("app1", "i1", "ch2", KEYS[0], OPEN_POLICY)  # newly reported
    assert rec.port_policy == OPEN_POLICY and rec.port_policy_hash == "ch2"
    await ctl.set_admin_policy("i1", None)
    assert ctl.table.get("i1").policy()[0] == OPEN_POLICY  # type: ignore[union-attr]
    with pytest.raises(NotFoundError, match="not registered"):
        await ctl.set_admin_policy("nobody", OPEN_POLICY)


@pytest.mark.parametrize(
    ("app", "iid", "key", "message"),
    [
        ("app2", "i1", KEYS[5], "instance id is registered to another app"),
        ("app1", "i9", KEYS[0], "wireguard public key is used by another instance"),
        ("app2", "i9", KEYS[0], "wireguard public key is used by another instance"),
        ("app1", "i9", "not-a-key", "invalid wireguard public key"),
        ("", "i9", KEYS[5], "app_id or instance_id is empty"),
        ("app1", "", KEYS[5], "app_id or instance_id is empty"),
    ],
)
async def test_refusals_change_nothing(
    tmp_path, app: str, iid: str, key: str, message: str
) -> None:
    ctl, wg, _ = make(tmp_path)
    await ctl.register("app1", "i1", "ch1", KEYS[0], OPEN_POLICY)
    state, table, applied = ctl.store.load(), ctl.table.snapshot(), list(wg.applied)
    with pytest.raises(RegistrationRefused, match=message):
        await ctl.register(app, iid, "ch9", key, OPEN_POLICY)
    assert ctl.store.load() == state and ctl.table.snapshot() == table and wg.applied == applied


async def test_a_node_marked_down_refuses_and_leaves_the_peer_list(tmp_path) -> None:
    ctl, _, _ = make(tmp_path)
    await ctl.set_node_status(1, "down")
    with pytest.raises(RegistrationRefused, match=NODE_DOWN_MESSAGE):
        await ctl.register("app1", "i1", "ch1", KEYS[0], None)
    assert ctl.active_nodes() == [] and ctl.store.load().instances == {}
    await ctl.set_node_status(1, "up")
    await ctl.register("app1", "i1", "ch1", KEYS[0], None)
    assert ctl.active_nodes() == [ctl.node.info()]
    with pytest.raises(RegistrationRefused, match='"up" or "down"'):
        await ctl.set_node_status(1, "sideways")


async def test_the_pool_runs_out_with_a_clear_error(tmp_path) -> None:
    ctl, _, _ = make(tmp_path, crange="10.0.0.0/30")  # hosts .1 (the gateway) and .2
    await ctl.register("app1", "i1", "ch", KEYS[0], None)
    with pytest.raises(IpPoolExhausted, match="ip pool exhausted"):
        await ctl.register("app1", "i2", "ch", KEYS[1], None)
    assert set(ctl.store.load().instances) == {"i1"}


async def test_state_survives_a_restart(tmp_path) -> None:
    ctl, _, clock = make(tmp_path)
    await ctl.register("app1", "i1", "ch1", KEYS[0], OPEN_POLICY)
    await ctl.register("app2", "i2", "ch2", KEYS[1], None)
    await ctl.set_admin_policy("i2", PortPolicy(True, {80: False}))
    await ctl.set_node_status(7, "down")
    again, wg, _ = make(tmp_path, clock=clock)
    await again.start()
    assert again.table.snapshot()["instances"] == ctl.table.snapshot()["instances"]
    assert KEYS[0] in wg.applied[-1] and KEYS[1] in wg.applied[-1]
    assert again.node_status(7) == "down"
    third = await again.register("app3", "i3", "ch3", KEYS[2], None)
    assert third.ip == "10.0.0.4"  # the restored addresses stay taken


async def test_recycling_removes_only_stale_instances(tmp_path) -> None:
    ctl, wg, clock = make(tmp_path)
    await ctl.register("app1", "old", "ch", KEYS[0], None)
    await ctl.register("app1", "alive", "ch", KEYS[1], None)
    clock.t += 11 * 3600
    await ctl.register("app1", "new", "ch", KEYS[2], None)
    wg.handshakes = {KEYS[1]: clock.t - 60, KEYS[0]: 0}
    await ctl.poll_handshakes()
    assert await ctl.recycle(10 * 3600) == ["old"]
    assert set(ctl.store.load().instances) == {"alive", "new"}
    assert ctl.table.get("old") is None and KEYS[0] not in wg.applied[-1]


async def test_in_a_cluster_recycling_goes_by_the_latest_handshake_any_node_saw(tmp_path) -> None:
    ctl, wg, clock = make(tmp_path)
    await ctl.register("app1", "elsewhere", "ch", KEYS[0], None)
    await ctl.register("app1", "gone", "ch", KEYS[1], None)
    clock.t += 11 * 3600
    wg.handshakes = {}  # this node saw neither; node 2 saw "elsewhere" a minute ago
    await ctl.poll_handshakes()
    ctl.cluster_handshakes = {"elsewhere": {2: int(clock.t - 60)}, "gone": {2: 1}}
    assert await ctl.recycle(10 * 3600) == ["gone"]
    assert set(ctl.store.load().instances) == {"elsewhere"}


async def test_handshakes_reach_the_table_and_a_failed_read_keeps_the_last(tmp_path) -> None:
    ctl, wg, clock = make(tmp_path)
    await ctl.register("app1", "i1", "ch", KEYS[0], OPEN_POLICY)
    wg.handshakes = {KEYS[0]: 0}
    await ctl.poll_handshakes()
    with pytest.raises(RouteError, match="no healthy instance"):
        ctl.table.resolve("app1", 80)
    ctl.handshakes.refresh = 0
    wg.handshakes = {KEYS[0]: clock.t - 5}
    await ctl.poll_handshakes()
    assert ctl.table.resolve("app1", 80)[0].host == "10.0.0.2"
    assert ctl.online() == 1
    wg.handshakes = DstackError("wg is gone")
    await ctl.poll_handshakes()
    assert ctl.table.resolve("app1", 80)[0].host == "10.0.0.2"  # the stale map still serves


async def test_a_fetched_policy_is_stored(tmp_path) -> None:
    ctl, _, _ = make(tmp_path)
    await ctl.register("app1", "i1", "ch1", KEYS[0], None)
    ctl.table.set_reported_policy("i1", OPEN_POLICY)
    ctl.policy_fetched("i1", OPEN_POLICY)
    for _ in range(100):
        if ctl.store.load().instances["i1"].port_policy is not None:
            break
        import asyncio

        await asyncio.sleep(0.01)
    rec = ctl.store.load().instances["i1"]
    assert rec.port_policy == OPEN_POLICY and rec.port_policy_hash == "ch1"


registration = st.tuples(
    st.sampled_from(["appA", "appB", "appC"]),
    st.sampled_from(["i1", "i2", "i3", "i4", "i5"]),
    st.sampled_from(range(len(KEYS))),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(regs=st.lists(registration, max_size=25))
async def test_no_registration_sequence_routes_one_app_to_another(tmp_path_factory, regs) -> None:
    ctl, _, clock = make(tmp_path_factory.mktemp("p"))
    owner: dict[str, str] = {}
    #: the app whose cvm holds each key (a cvm only registers its own key)
    key_app: dict[str, str] = {}
    for app, iid, k in regs:
        try:
            await ctl.register(app, iid, "ch", KEYS[k], OPEN_POLICY)
            owner.setdefault(iid, app)
            key_app[KEYS[k]] = app
        except RegistrationRefused:
            pass
    state = ctl.store.load()
    ctl.table.set_handshakes({i.public_key: clock.t for i in state.instances.values()})
    assert {i.instance_id: i.app_id for i in ctl.table.instances()} == {
        k: v.app_id for k, v in state.instances.items()
    }
    ips = [i.ip for i in state.instances.values()]
    keys = [i.public_key for i in state.instances.values()]
    assert len(set(ips)) == len(ips) and len(set(keys)) == len(keys)
    for iid, app in owner.items():
        assert state.instances[iid].app_id == app  # the first app to register it keeps it
        # and its tunnel (the key its traffic is encrypted to) belongs to a cvm of that app
        assert key_app[state.instances[iid].public_key] == app
    for app in ("appA", "appB", "appC"):
        try:
            got = ctl.table.resolve(app, 80)
        except RouteError:
            continue
        assert all(c.instance is not None and c.instance.app_id == app for c in got)
    for iid in owner:
        assert [c.instance.app_id for c in ctl.table.resolve(iid, 80)] == [owner[iid]]  # type: ignore[union-attr]
