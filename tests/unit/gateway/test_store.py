"""the gateway's local state store: atomic commits, private files, aborts that change nothing,
a restart that reads back what was written, and refusals of a state file it cannot trust."""

from __future__ import annotations

import json
import stat

import pytest

from pydstack.errors import ConfigError
from pydstack.gateway.policy import PortPolicy
from pydstack.gateway.store import (
    STATE_FILE,
    GatewayState,
    InstanceRecord,
    LocalFileStore,
    NodeInfo,
)

POLICY = PortPolicy(restrict_mode=True, ports={8080: False, 443: True})


def rec(iid: str, ip: str = "10.0.0.2", **kw: object) -> InstanceRecord:
    return InstanceRecord(iid, "app", ip, f"key-{iid}", 1.5, **kw)  # type: ignore[arg-type]


async def test_a_commit_is_written_private_and_read_back_after_a_restart(tmp_path) -> None:
    store = LocalFileStore(tmp_path / "data")

    def add(state: GatewayState) -> str:
        state.instances["i1"] = rec("i1", port_policy=POLICY, port_policy_hash="ch",
                                    admin_port_policy=PortPolicy(True, {}))  # fmt: skip
        state.node_status[3] = "down"
        return "done"

    assert await store.transact(add) == "done"
    path = tmp_path / "data" / STATE_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    again = LocalFileStore(tmp_path / "data").load()
    assert again.instances == {"i1": add_expected()}
    assert again.node_status == {3: "down"} and again.status_of(1) == "up"
    assert not list((tmp_path / "data").glob(".*tmp"))  # no temporary file left behind


def add_expected() -> InstanceRecord:
    return rec("i1", port_policy=POLICY, port_policy_hash="ch",
               admin_port_policy=PortPolicy(True, {}))  # fmt: skip


async def test_a_failing_transaction_changes_nothing(tmp_path) -> None:
    store = LocalFileStore(tmp_path)
    await store.transact(lambda s: s.instances.update(i1=rec("i1")))
    before = (tmp_path / STATE_FILE).read_bytes()

    def bad(state: GatewayState) -> None:
        state.instances["i2"] = rec("i2", "10.0.0.3")
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        await store.transact(bad)
    assert set(store.load().instances) == {"i1"}
    assert (tmp_path / STATE_FILE).read_bytes() == before


async def test_load_hands_out_copies(tmp_path) -> None:
    store = LocalFileStore(tmp_path)
    await store.transact(lambda s: s.instances.update(i1=rec("i1")))
    copy = store.load()
    copy.instances.clear()
    assert set(store.load().instances) == {"i1"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is unreadable"),
        ('{"version": 9}', "unknown state version"),
        ('{"version": 1, "instances": []}', "must be objects"),
        ('{"version": 1, "instances": {"i": {"ip": 5}}}', "ip must be a string"),
        ('{"version": 1, "instances": {}, "node_status": {"1": "sideways"}}', "up or down"),
        (json.dumps({"version": 1, "instances": {"i": {"port_policy": {"ports": [{"port": 0}]}}}}),
         "not in 1..65535"),
        ('{"version": 1, "nodes": {"2": {"url": 5}}}', "url must be a string"),
        ('{"version": 1, "nodes": {"2": {"uuid": "zz"}}}', "non-hexadecimal"),
        ('{"version": 1, "nodes": []}', "must be objects"),
    ],
)  # fmt: skip
def test_a_state_file_that_cannot_be_trusted_refuses_the_start(
    tmp_path, content: str, message: str
) -> None:
    (tmp_path / STATE_FILE).write_text(content)
    with pytest.raises(ConfigError, match=message) as e:
        LocalFileStore(tmp_path)
    assert STATE_FILE in str(e.value)


async def test_node_infos_round_trip_and_a_single_nodes_file_has_none(tmp_path) -> None:
    store = LocalFileStore(tmp_path)
    await store.transact(lambda s: s.node_status.__setitem__(1, "down"))
    assert "nodes" not in json.loads((tmp_path / STATE_FILE).read_text())
    info = NodeInfo(2, "https://gw2:9012", "pk", "192.0.2.2:9013", "10.8.0.2/16", b"\x07" * 16)
    await store.transact(lambda s: s.nodes.__setitem__(2, info))
    assert LocalFileStore(tmp_path).load().nodes == {2: info}
