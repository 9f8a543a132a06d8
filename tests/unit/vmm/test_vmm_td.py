"""the simulated TD a VMM holds for a CVM, and the guest's client of it over the host API."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from pydstack.attest.eventlog import RuntimeEvent, replay_rtmrs, replay_runtime_events
from pydstack.attest.identity import mr_config_id_v1
from pydstack.attest.quote import parse_quote
from pydstack.attest.verify import verify_quote
from pydstack.rpc.proto import host_api_pb2 as hpb
from pydstack.rpc.server import CallContext, PrpcServer, PrpcService
from pydstack.tee.hosttd import HostTdError, HostTdx
from pydstack.tee.simulated import SimulatedTdx
from pydstack.vmm.td import (
    MAX_EVENT_PAYLOAD,
    MAX_EVENTS,
    MAX_STATE_FILE,
    TDX_HOST,
    TdError,
    TdIdentity,
    TdxHostImpl,
    VmTd,
)
from tests.peak import allocation_peak

SEED = bytes(range(32))
COMPOSE_HASH = hashlib.sha256(b'{"name":"app"}').digest()
CTX = CallContext(None, None, None)


def td(tmp_path: Path) -> VmTd:
    return VmTd.fresh(SEED, TdIdentity("image-digest", COMPOSE_HASH), tmp_path / "td.json")


def test_fresh_td_quotes_verify_and_carry_the_image_and_compose(tmp_path):
    t = td(tmp_path)
    quote, log_json = t.quote(b"nonce")
    sim = SimulatedTdx(SEED)
    verified = verify_quote(quote, sim.collateral_json(), root_ca_der=sim.root_ca_der)
    report = verified.quote.td_report
    assert report is not None
    assert report.mr_td == SimulatedTdx(SEED, os_image="image-digest").mrtd
    assert report.mr_config_id == mr_config_id_v1(COMPOSE_HASH)
    assert report.rtmr3 == bytes(48)
    assert report.report_data == b"nonce".ljust(64, b"\0")
    assert "image-digest" not in log_json  # digests only, no seed or image names in the log
    # another image gives other build-time registers
    other = VmTd.fresh(SEED, TdIdentity("other-image", COMPOSE_HASH), tmp_path / "o.json")
    assert parse_quote(other.quote(b"")[0]).td_report.rtmr0 != report.rtmr0  # type: ignore[union-attr]


def test_extend_is_measured_persisted_0600_and_resumed(tmp_path):
    t = td(tmp_path)
    events = [RuntimeEvent("app-id", b"\x01" * 20), RuntimeEvent("compose-hash", COMPOSE_HASH, 2)]
    for ev in events:
        t.extend_rtmr3(ev)
    quote, log_json = t.quote(b"")
    report = parse_quote(quote).td_report
    assert report is not None and report.rtmr3 == replay_runtime_events(events)
    state = tmp_path / "td.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert SEED.hex() not in state.read_text()
    resumed = VmTd.resume(SEED, state)
    assert resumed.rtmrs == t.rtmrs and resumed.mrtd == t.mrtd
    assert resumed.quote(b"")[1] == log_json
    # a new boot starts from zero again
    again = VmTd.fresh(SEED, TdIdentity("image-digest", COMPOSE_HASH), state)
    assert again.rtmrs[3] == bytes(48)
    assert json.loads(state.read_text())["events"] == []


def test_td_refuses_what_a_td_does_not_do(tmp_path):
    t = td(tmp_path)
    with pytest.raises(TdError, match="payload exceeds"):
        t.extend_rtmr3(RuntimeEvent("x", b"\0" * (MAX_EVENT_PAYLOAD + 1)))
    with pytest.raises(TdError, match="name must be"):
        t.extend_rtmr3(RuntimeEvent("", b""))
    with pytest.raises(TdError, match="version"):
        t.extend_rtmr3(RuntimeEvent("x", b"", 7))
    with pytest.raises(TdError, match="longer than 64"):
        t.quote(b"x" * 65)
    for i in range(MAX_EVENTS):
        t.extend_rtmr3(RuntimeEvent("e", i.to_bytes(4, "little")))
    with pytest.raises(TdError, match="already holds"):
        t.extend_rtmr3(RuntimeEvent("e", b"one too many"))
    with pytest.raises(ValueError, match="32 bytes"):
        VmTd.fresh(SEED, TdIdentity("i", COMPOSE_HASH[:31]), tmp_path / "x.json")


async def test_only_rtmr3_is_extendable_through_the_host_api(tmp_path):
    t = td(tmp_path)
    impl = TdxHostImpl(lambda: t)
    before = t.rtmrs
    for rtmr in (0, 1, 2, 4):
        with pytest.raises(TdError, match="only rtmr3"):
            await impl.ExtendRtmr(hpb.TdExtendRequest(rtmr=rtmr, event="x"), CTX)
    assert t.rtmrs == before
    await impl.ExtendRtmr(hpb.TdExtendRequest(rtmr=3, event="x", payload=b"y"), CTX)
    assert t.rtmrs[:3] == before[:3] and t.rtmrs[3] != before[3]
    with pytest.raises(TdError, match="no td"):
        await TdxHostImpl(lambda: None).GetQuote(hpb.TdQuoteRequest(), CTX)


async def test_guest_client_over_the_host_socket(tmp_path):
    t = td(tmp_path)
    server = PrpcServer(max_body=64 * 1024)
    server.mount(PrpcService(TDX_HOST, TdxHostImpl(lambda: t), prefix="/tdx"))
    sock = tmp_path / "api.sock"
    await server.listen_unix(sock, mode=0o600)
    try:
        client = HostTdx(sock)

        def guest_side() -> tuple[bytes, list[object], list[RuntimeEvent]]:
            client.extend_rtmr3(RuntimeEvent("system-preparing", b""))
            client.extend_rtmr3(RuntimeEvent("app-id", os.urandom(20)))
            quote = client.get_quote(b"rd")
            return quote, list(client.event_log()), client.runtime_events()

        quote, log, runtime = await asyncio.to_thread(guest_side)
        report = parse_quote(quote).td_report
        assert report is not None
        assert replay_rtmrs(log) == report.rtmrs == t.rtmrs  # type: ignore[arg-type]
        assert [e.event for e in runtime] == ["system-preparing", "app-id"]
        with pytest.raises(HostTdError, match="longer than 64"):
            await asyncio.to_thread(client._call, "GetQuote", {"report_data": "00" * 65})
        with pytest.raises(HostTdError, match="only rtmr3"):
            await asyncio.to_thread(client._call, "ExtendRtmr", {"rtmr": 1, "event": "x"})
        gone = HostTdx(tmp_path / "nothing.sock")
        with pytest.raises(HostTdError, match="unreachable"):
            await asyncio.to_thread(gone.get_quote, b"")
    finally:
        await server.close()


def test_resume_pays_for_the_state_file_not_for_its_cap(tmp_path):
    """`f.read(MAX_STATE_FILE + 1)` allocated the whole 16 MiB cap for every state file, however
    small (a fuzz finding); the state is read in chunks now."""
    t = td(tmp_path)
    t.extend_rtmr3(RuntimeEvent("app-id", b"\x01" * 20))
    state = tmp_path / "td.json"
    peak = allocation_peak(
        f"from pathlib import Path\nfrom pydstack.vmm.td import VmTd\n"
        f"seed = bytes.fromhex({SEED.hex()!r})\npath = Path({str(state)!r})",
        "VmTd.resume(seed, path)",
    )
    assert peak < 1024 * 1024, peak
    (tmp_path / "big.json").write_bytes(b" " * (MAX_STATE_FILE + 1))
    with pytest.raises(ValueError, match="too large"):
        VmTd.resume(SEED, tmp_path / "big.json")
