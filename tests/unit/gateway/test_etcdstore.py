"""the gateway's state, the certbot's key-value space and lock, and connection counts mapped onto
etcd, against an in-memory etcd that evaluates the same transactions (compare on mod revision,
puts, deletes, ranges, leases): conflicts are retried with the function re-applied and the
address stays unique, retries are bounded, a malformed record is refused by key, an etcd that is
away changes nothing and leaves the last state loadable; and the client's own pieces (endpoint
checks, failover to the next member, bounds)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from pydstack.errors import ConfigError
from pydstack.gateway.etcd import (
    MAX_VALUE_BYTES,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    Kv,
    TxnResult,
    check_endpoint,
    op_put,
    prefix_end,
)
from pydstack.gateway.etcdstore import (
    EtcdConflict,
    EtcdDomainLock,
    EtcdKv,
    EtcdStore,
    connection_counts,
    handshake_times,
)
from pydstack.gateway.store import InstanceRecord, NodeInfo


def _d(text: str | None) -> bytes:
    return base64.b64decode(text or "")


class FakeEtcd:
    """the subset of EtcdClient the stores use, over a dict, with etcd's revision rules."""

    def __init__(self) -> None:
        self.kv: dict[bytes, Kv] = {}
        self.rev = 1
        self.leases: set[int] = set()
        self.down = False
        #: called before each committing transaction (to make another node's change first)
        self.before_commit: Callable[[], None] | None = None
        self.commits = 0

    def _check(self) -> None:
        if self.down:
            raise EtcdUnavailable("etcd is unavailable (fake: down)")

    def _put(self, key: bytes, value: bytes, lease: int = 0) -> None:
        old = self.kv.get(key)
        self.kv[key] = Kv(key, value, old.create_revision if old else self.rev, self.rev, lease)

    def _range(self, key: bytes, end: bytes | None) -> list[Kv]:
        if end is None:
            return [self.kv[key]] if key in self.kv else []
        return [v for k, v in sorted(self.kv.items()) if key <= k < end]

    def write(self, key: bytes, value: bytes) -> None:
        """another node's write."""
        self.rev += 1
        self._put(key, value)

    async def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
                  failure: list[dict[str, Any]] | None = None) -> TxnResult:  # fmt: skip
        self._check()
        if compare and self.before_commit is not None:
            self.before_commit()
        ok = True
        for c in compare:
            cur = self.kv.get(_d(c["key"]))
            if c["target"] == "MOD":
                ok &= (cur.mod_revision if cur else 0) == int(c["mod_revision"])
            else:
                ok &= cur is not None and cur.value == _d(c["value"])
        ops = success if ok else (failure or [])
        ranges = []
        wrote = any("request_range" not in op for op in ops)
        if wrote:
            self.rev += 1
            self.commits += 1
        for op in ops:
            if "request_range" in op:
                r = op["request_range"]
                end = _d(r["range_end"]) if "range_end" in r else None
                ranges.append(tuple(self._range(_d(r["key"]), end)))
            elif "request_put" in op:
                p = op["request_put"]
                self._put(_d(p["key"]), _d(p.get("value")), int(p.get("lease", 0)))
            else:
                self.kv.pop(_d(op["request_delete_range"]["key"]), None)
        return TxnResult(ok, self.rev, tuple(ranges))

    async def range(self, key: bytes, range_end: bytes | None = None, *, limit: int = 0):
        self._check()
        return self._range(key, range_end), self.rev

    async def get(self, key: bytes) -> Kv | None:
        self._check()
        return self.kv.get(key)

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        self._check()
        self.rev += 1
        self._put(key, value, lease)
        return self.rev

    async def delete(self, key: bytes, range_end: bytes | None = None) -> int:
        self._check()
        self.rev += 1
        return 1 if self.kv.pop(key, None) else 0

    async def grant(self, ttl: int) -> int:
        self._check()
        lease = len(self.leases) + 100
        self.leases.add(lease)
        return lease

    async def keepalive(self, lease: int) -> int:
        return 10 if lease in self.leases else 0

    async def revoke(self, lease: int) -> None:
        self.leases.discard(lease)
        for k in [k for k, v in self.kv.items() if v.lease == lease]:
            del self.kv[k]

    def expire(self, lease: int) -> None:
        """the lease runs out (its holder died)."""
        self.leases.discard(lease)
        for k in [k for k, v in self.kv.items() if v.lease == lease]:
            del self.kv[k]


def rec(iid: str, ip: str, key: str = "") -> InstanceRecord:
    return InstanceRecord(iid, "app", ip, key or f"key-{iid}", 1.0)


def first_free(iid: str, calls: list[str] | None = None):
    def tx(state):
        if calls is not None:
            calls.append(iid)
        taken = state.allocated()
        ip = next(f"10.0.0.{n}" for n in range(2, 250) if f"10.0.0.{n}" not in taken)
        state.instances[iid] = rec(iid, ip)
        return ip

    return tx


async def store(fake: FakeEtcd, **kw: Any) -> EtcdStore:
    s = EtcdStore(fake, "/gw", **kw)  # type: ignore[arg-type]
    await s.open()
    return s


async def test_the_state_lives_under_upstreams_key_names() -> None:
    fake = FakeEtcd()
    s = await store(fake)
    await s.transact(first_free("i1"))
    info = NodeInfo(2, "https://gw2", "pk", "192.0.2.2:51820", "10.0.0.254/24", b"\x01" * 16)

    def tx(state):
        state.nodes[2] = info
        state.node_status[2] = "down"

    await s.transact(tx)
    keys = sorted(k.decode() for k in fake.kv)
    assert keys == ["/gw/inst/i1", "/gw/node/info/2", "/gw/node/status/2", "/gw/state/seq"]
    assert fake.kv[b"/gw/node/status/2"].value == b"down"
    # another node reading the same etcd sees the same state
    other = await store(fake)
    assert other.load() == s.load() and other.load().nodes[2] == info


async def test_a_conflict_is_retried_and_the_address_stays_unique() -> None:
    fake = FakeEtcd()
    s = await store(fake)
    other = await store(fake)
    calls: list[str] = []

    def race() -> None:  # another node takes 10.0.0.2 between our read and our commit
        fake.before_commit = None
        fake.write(b"/gw/inst/x", b'{"app_id":"a","ip":"10.0.0.2","public_key":"kx"}')
        fake.write(b"/gw/state/seq", b"x")

    fake.before_commit = race
    ip = await s.transact(first_free("i1", calls))
    assert calls == ["i1", "i1"] and ip == "10.0.0.3"
    assert set(s.load().instances) == {"x", "i1"}
    assert await other.transact(first_free("i2")) == "10.0.0.4"


async def test_retries_are_bounded_and_nothing_is_written() -> None:
    fake = FakeEtcd()
    s = await store(fake, max_retries=3)
    calls: list[str] = []

    def always() -> None:
        fake.write(b"/gw/state/seq", b"other")

    fake.before_commit = always
    with pytest.raises(EtcdConflict, match="conflicted with other gateway nodes 3 times"):
        await s.transact(first_free("i1", calls))
    assert len(calls) == 3 and b"/gw/inst/i1" not in fake.kv


async def test_an_unchanged_state_writes_nothing_and_an_exception_aborts() -> None:
    fake = FakeEtcd()
    s = await store(fake)
    await s.transact(first_free("i1"))
    commits = fake.commits
    assert await s.transact(lambda state: len(state.instances)) == 1
    with pytest.raises(KeyError):
        await s.transact(lambda state: state.instances.pop("nobody"))
    assert fake.commits == commits


async def test_only_changed_keys_are_written_and_removals_delete() -> None:
    fake = FakeEtcd()
    s = await store(fake)
    await s.transact(first_free("i1"))
    await s.transact(first_free("i2"))
    before = fake.kv[b"/gw/inst/i1"].mod_revision
    await s.transact(first_free("i3"))
    assert fake.kv[b"/gw/inst/i1"].mod_revision == before
    await s.transact(lambda state: state.instances.pop("i2"))
    assert b"/gw/inst/i2" not in fake.kv and set(s.load().instances) == {"i1", "i3"}


async def test_a_malformed_record_is_refused_by_its_key() -> None:
    fake = FakeEtcd()
    fake.write(b"/gw/inst/bad", b"not json")
    with pytest.raises(EtcdError, match="/gw/inst/bad is malformed"):
        await store(fake)
    fake.kv.clear()
    fake.write(b"/gw/node/status/3", b"sideways")
    with pytest.raises(EtcdError, match="/gw/node/status/3 is malformed"):
        await store(fake)


async def test_etcd_away_changes_nothing_and_the_last_state_stays_loadable() -> None:
    fake = FakeEtcd()
    s = await store(fake)
    await s.transact(first_free("i1"))
    fake.down = True
    with pytest.raises(EtcdUnavailable):
        await s.transact(first_free("i2"))
    assert set(s.load().instances) == {"i1"}
    fake.down = False
    assert set(s.load().instances) == {"i1"} and b"/gw/inst/i2" not in fake.kv


async def test_refresh_reports_other_nodes_changes_only() -> None:
    fake = FakeEtcd()
    s = await store(fake)
    other = await store(fake)
    seen: list[set[str]] = []

    async def on_change(state) -> None:
        seen.append(set(state.instances))

    await s.transact(first_free("i1"))
    await s.refresh(on_change)  # its own change: already known
    assert seen == []
    await other.transact(first_free("i2"))
    await s.refresh(on_change)
    assert seen == [{"i1", "i2"}] and set(s.load().instances) == {"i1", "i2"}


async def test_the_certbot_kv_is_under_the_prefix_and_cannot_touch_the_state() -> None:
    fake = FakeEtcd()
    kv = EtcdKv(fake, "/gw")  # type: ignore[arg-type]
    await kv.put("cert/a.example/data", "pem")
    await kv.put("dns_cred/1", "cred")
    assert fake.kv[b"/gw/cert/a.example/data"].value == b"pem"
    assert await kv.get("cert/a.example/data") == "pem" and await kv.get("nothing") is None
    assert await kv.list_prefix("cert/") == {"cert/a.example/data": "pem"}
    await kv.delete("dns_cred/1")
    assert await kv.get("dns_cred/1") is None
    for key in ("inst/x", "node/status/1", "state/seq", "conn/x/1", "lock/x"):
        with pytest.raises(ValueError, match="belongs to the gateway's own state"):
            await kv.put(key, "x")


async def test_the_renewal_lock_is_exclusive_token_bound_and_dies_with_its_lease() -> None:
    fake = FakeEtcd()
    lock = EtcdDomainLock(fake, "/gw", clock=lambda: 1000.0)  # type: ignore[arg-type]
    token = await lock.acquire("a.example", "node1", 600)
    assert token is not None
    assert await lock.acquire("a.example", "node2", 600) is None
    info = await lock.holder("a.example")
    assert info is not None and (info.holder, info.expires_at) == ("node1", 1600.0)
    assert not await lock.release("a.example", "wrong-token")
    assert await lock.refresh("a.example", token, 900)
    assert not await lock.refresh("a.example", "wrong-token", 900)
    # the holder dies: its lease runs out and another node takes the lock
    fake.expire(fake.kv[b"/gw/lock/a.example"].lease)
    assert await lock.holder("a.example") is None
    token2 = await lock.acquire("a.example", "node2", 600)
    assert token2 is not None and not await lock.release("a.example", token)
    assert await lock.release("a.example", token2) and await lock.holder("a.example") is None
    await lock.acquire("b.example", "node1", 600)
    assert await lock.force_release("b.example") and not await lock.force_release("b.example")
    with pytest.raises(ValueError, match="ttl must be positive"):
        await lock.acquire("c.example", "node1", 0)
    assert len(fake.leases) == 0  # no lease left behind


async def test_connection_counts_are_leased_per_node_and_stale_ones_dropped() -> None:
    fake = FakeEtcd()
    one = connection_counts(fake, "/gw", 1, ttl=30)  # type: ignore[arg-type]
    two = connection_counts(fake, "/gw", 2, ttl=30)  # type: ignore[arg-type]
    await one.push({"i1": 3, "i2": 0})
    await two.push({"i1": 1})
    assert await one.read() == {"i1": {1: 3, 2: 1}}
    await one.push({"i2": 5})
    assert await one.read() == {"i1": {2: 1}, "i2": {1: 5}}
    fake.expire(two._lease)  # node 2 died
    assert await one.read() == {"i2": {1: 5}}
    await two.push({"i1": 2})  # back: a new lease
    assert await one.read() == {"i1": {2: 2}, "i2": {1: 5}}
    # values that did not change are not written again (the lease keeps them)
    commits = fake.commits
    await one.push({"i2": 5})
    assert fake.commits == commits


async def test_handshake_times_live_beside_the_counts() -> None:
    fake = FakeEtcd()
    seen = handshake_times(fake, "/gw", 3, ttl=30)  # type: ignore[arg-type]
    await seen.push({"i1": 1_700_000_000, "i2": 0})
    assert sorted(fake.kv) == [b"/gw/handshake/i1/3"]
    assert await seen.read() == {"i1": {3: 1_700_000_000}}
    await seen.close()
    assert await seen.read() == {}


# ---------------------------------------------------------------------- the client itself
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://user:pw@h:2379", "must not carry a user or password"),
        ("http://h:2379/v3", "no path"),
        ("http://h:2379?x=1", "no path"),
        ("unix:///run/etcd.sock", "must be http"),
        ("http://h", "must be http"),
        ("http://h:99999", "not a url"),
    ],
)
def test_endpoints_are_checked(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        check_endpoint(url)
    assert "pw" not in str(e.value)


def test_prefix_end_and_value_bounds() -> None:
    assert prefix_end(b"/gw/inst/") == b"/gw/inst0"
    assert prefix_end(b"a\xff") == b"b" and prefix_end(b"\xff") == b"\0"
    assert check_endpoint("https://10.0.0.1:2379/") == "https://10.0.0.1:2379"
    with pytest.raises(EtcdError, match="over the"):
        op_put(b"k", b"x" * (MAX_VALUE_BYTES + 1))


async def test_the_client_fails_over_and_reports_every_endpoint(unused_tcp_port_factory) -> None:
    answers: list[dict[str, Any]] = [{"code": 14, "message": "etcdserver: leader changed"}]

    async def kv_range(request: web.Request) -> web.Response:
        return web.json_response(answers.pop(0) if answers else {"header": {"revision": "7"}})

    app = web.Application()
    app.router.add_post("/v3/kv/range", kv_range)
    runner = web.AppRunner(app)
    await runner.setup()
    live = unused_tcp_port_factory()
    await web.TCPSite(runner, "127.0.0.1", live).start()
    dead = unused_tcp_port_factory()
    client = EtcdClient([f"http://127.0.0.1:{dead}", f"http://127.0.0.1:{live}"], timeout=5)
    try:
        # the first member refuses, the second is unavailable: both named, nothing else
        with pytest.raises(EtcdUnavailable) as e:
            await client.range(b"k")
        assert str(e.value) == (
            f"etcd is unavailable (http://127.0.0.1:{dead}: Connection refused; "
            f"http://127.0.0.1:{live}: etcdserver: leader changed)"
        )
        # then the live one answers, and is asked first from then on
        assert await client.range(b"k") == ([], 7)
        assert client.endpoints[client._current].endswith(str(live))
        answers.append({"code": 3, "message": "etcdserver: key is not provided"})
        with pytest.raises(EtcdError, match="etcd refused /v3/kv/range: etcdserver: key is not"):
            await client.range(b"k")
    finally:
        await client.close()
        await runner.cleanup()


# ---------------------------------------------------------------------- two nodes' control planes
def control(fake: FakeEtcd, node_id: int, st: EtcdStore):
    from pydstack.gateway.control import GatewayControl, NodeIdentity
    from pydstack.gateway.routes import RouteTable
    from pydstack.gateway.wgconf import WgNetwork, generate_private_key, public_key_of

    private = generate_private_key()
    me = NodeIdentity(node_id, f"https://gw{node_id}:9012", public_key_of(private), private,
                      f"10.0.0.{node_id}/24", f"192.0.2.{node_id}:51820", 51820)  # fmt: skip
    wg = RecordedWg()
    net = WgNetwork.parse(f"10.0.0.{node_id}/24", ["10.0.0.0/28"], "10.0.0.0/24")
    return GatewayControl(st, RouteTable(), net, me, wg), wg


class RecordedWg:
    def __init__(self) -> None:
        self.applied: list[str] = []

    async def apply(self, config: str) -> None:
        self.applied.append(config)

    async def latest_handshakes(self) -> dict[str, float]:
        return {}


async def test_nodes_share_instances_peers_and_status_through_the_store() -> None:
    from pydstack.gateway.control import NODE_DOWN_MESSAGE, RegistrationRefused
    from pydstack.gateway.wgconf import generate_private_key, public_key_of

    fake = FakeEtcd()
    s1, s2 = await store(fake), await store(fake)
    c1, wg1 = control(fake, 1, s1)
    c2, wg2 = control(fake, 2, s2)
    for c in (c1, c2):
        await c.start()
        await c.announce()
    await s1.refresh(c1.sync_state)
    assert [n.node_id for n in c1.active_nodes()] == [1, 2] == [n.node_id for n in c2.known_nodes()]

    key = public_key_of(generate_private_key())
    rec = await c1.register("app", "i1", "ch", key, None)
    assert rec.ip == "10.0.0.16"  # after the reserved /28
    # node 2 follows: the route and the wireguard peer appear there too
    await s2.refresh(c2.sync_state)
    inst = c2.table.get("i1")
    assert inst is not None and inst.ip == rec.ip
    assert f"PublicKey = {key}\nAllowedIPs = {rec.ip}/32" in wg2.applied[-1]
    # re-registering on node 2 keeps the address; node 2's next one is unique
    again = await c2.register("app", "i1", "ch", key, None)
    assert again.ip == rec.ip
    other = await c2.register("app", "i2", "ch", public_key_of(generate_private_key()), None)
    assert other.ip == "10.0.0.17"
    # node 1 marks node 2 down: node 2 refuses, node 1 stops handing it out
    await c1.set_node_status(2, "down")
    with pytest.raises(RegistrationRefused, match=NODE_DOWN_MESSAGE):
        await c2.register("app", "i3", "ch", public_key_of(generate_private_key()), None)
    assert [n.node_id for n in c1.active_nodes()] == [1]
    # a removal on node 1 leaves node 2's table and peers
    await c1.remove(["i1"])
    await s2.refresh(c2.sync_state)
    assert c2.table.get("i1") is None and key not in wg2.applied[-1]
    assert wg1.applied and key not in wg1.applied[-1]


async def test_a_registration_while_etcd_is_away_is_refused_clearly() -> None:
    from pydstack.gateway.control import STORE_UNAVAILABLE, RegistrationRefused
    from pydstack.gateway.wgconf import generate_private_key, public_key_of

    fake = FakeEtcd()
    s1 = await store(fake)
    c1, _ = control(fake, 1, s1)
    await c1.start()
    fake.down = True
    with pytest.raises(RegistrationRefused) as e:
        await c1.register("app", "i1", "ch", public_key_of(generate_private_key()), None)
    assert str(e.value) == STORE_UNAVAILABLE and "fake" not in str(e.value)
    assert c1.table.get("i1") is None
