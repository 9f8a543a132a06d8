"""dstack-guest-agent on the real-tdx backend (configfs-tsm answered by a simulated td), its
config, and the external port's plain http routes."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import stat
import threading
import time
from urllib.parse import quote

import httpx
import pytest

from pydstack.attest.eventlog import RuntimeEvent, event_log_from_json
from pydstack.attest.verify import verify_quote
from pydstack.guest.agent import AgentConfig, build_core, run_agent
from pydstack.guest.http_routes import add_routes
from pydstack.guest.servers import ListenerOptions
from pydstack.guest.simulator import DEFAULT_COMPOSE, prepare
from pydstack.rpc.server import PrpcServer, ServerLimits
from pydstack.tee.real import ConfigfsTsm, RealTdx, RuntimeEventLog
from pydstack.tee.simulated import SimulatedTdx

from .simulator_proc import start_simulator


class SimulatedKernel:
    """a configfs-tsm directory whose quotes come from a simulated td."""

    def __init__(self, root, tdx: SimulatedTdx) -> None:
        self.root, self.tdx, self.stop = root, tdx, False
        root.mkdir()
        (root / "provider").write_text("tdx_guest\n")
        (root / "generation").write_text("0\n")
        (root / "inblob").write_bytes(b"")
        threading.Thread(target=self.run, daemon=True).start()

    def run(self) -> None:
        # a report is taken for every 64 bytes written; the blob is emptied once consumed, so
        # two requests within one mtime tick (or with the same report data) are both seen
        gen = 0
        inblob = self.root / "inblob"
        while not self.stop:
            if inblob.stat().st_size == 64:
                data = inblob.read_bytes()
                inblob.write_bytes(b"")
                (self.root / "outblob").write_bytes(self.tdx.get_quote(data))
                gen += 1
                (self.root / "generation").write_text(f"{gen}\n")
            time.sleep(0.002)


def test_config_parsing():
    cfg = AgentConfig.from_toml(
        '[default.core]\nkeys_file = "/k"\n[core]\ncompose_file = "/c"\n'
        '[internal]\naddress = "unix:/tmp/x.sock"\n[external]\naddress = ""\n'
    )
    assert str(cfg.keys_file) == "/k" and str(cfg.compose_file) == "/c"
    assert cfg.internal == "unix:/tmp/x.sock" and cfg.external == ""
    assert cfg.internal_v0 == "unix:/var/run/tappd.sock"
    assert cfg.options("internal") == ListenerOptions()  # 0660, no extra hosts
    assert cfg.server_limits == ServerLimits()
    with pytest.raises(ValueError, match="invalid agent config"):
        AgentConfig.from_toml("[core\n")


def test_listener_and_limits_config():
    cfg = AgentConfig.from_toml(
        '[default]\nkeep_alive = 10\n[internal]\nsocket_mode = "0600"\nsocket_group = 44\n'
        '[default.external]\nallowed_hosts = ["*.gw.example"]\n'
        'allowed_origins = ["https://app.example"]\n'
        "[server_limits]\nmax_connections = 100\n"
    )
    assert cfg.options("internal") == ListenerOptions(socket_mode=0o600, socket_group="44")
    assert cfg.options("internal-v0").socket_mode == 0o660
    guard = cfg.options("external").guard("external")
    assert guard.host_allowed("abc-8090.gw.example") and not guard.host_allowed("evil.example")
    assert guard.hosts_key == "[external] allowed_hosts"
    assert cfg.server_limits == ServerLimits(max_connections=100, idle_timeout=10)
    assert (
        AgentConfig.from_toml("[internal]\nsocket_mode = 0o640\n").options("internal").socket_mode
        == 0o640
    )
    for text, message in (
        ("[internal]\nsocket_mode = 660\n", r"\[internal\]: socket mode 660 is outside 0o777"),
        ('[internal]\nsocket_mode = "rw"\n', "not an octal number"),
        ('[external]\nallowed_hosts = "x"\n', r"\[external\]: allowed_hosts must be a list"),
        ("[server_limits]\nidle = 1\n", r"unknown key server_limits\.idle"),
    ):
        with pytest.raises(ValueError, match=message):
            AgentConfig.from_toml(text)


async def test_agent_on_configfs_tsm(tmp_path, vectors, monkeypatch):
    state = prepare(tmp_path / "shared", bytes(32))
    tdx = SimulatedTdx(bytes(32))
    kernel = SimulatedKernel(tmp_path / "tsm", tdx)
    rtmr = tmp_path / "rtmr"
    rtmr.mkdir()
    (rtmr / "rtmr3:sha384").write_bytes(b"")
    monkeypatch.setenv("DCAP_TDX_RTMR_SYSFS_PATH", str(rtmr))
    monkeypatch.setenv("DSTACK_CCEL_FILE", str(vectors / "dstack/ccel.bin"))
    platform = RealTdx(ConfigfsTsm(tmp_path / "tsm"), RuntimeEventLog(tmp_path / "log"))
    for name in ("system-preparing", "app-id"):
        ev = RuntimeEvent(name, b"\x01" * 20)
        platform.extend_rtmr3(ev)
        tdx.extend_rtmr3(ev)
    cfg = AgentConfig(
        keys_file=state.dir / ".appkeys.json",
        compose_file=state.dir / "app-compose.json",
        sys_config_file=state.dir / ".sys-config.json",
        internal=f"unix:{tmp_path}/dstack.sock",
        internal_v0=f"unix:{tmp_path}/tappd.sock",
        external="",
        listeners={"internal": ListenerOptions(socket_mode=0o640, socket_group="daemon")},
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run_agent(build_core(cfg, platform), cfg, stop))
    try:
        for _ in range(100):
            if (tmp_path / "tappd.sock").exists():
                break
            await asyncio.sleep(0.02)
        st = os.stat(tmp_path / "dstack.sock")  # as configured
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == grp.getgrnam("daemon").gr_gid
        # owner and group only by default
        assert stat.S_IMODE(os.stat(tmp_path / "tappd.sock").st_mode) == 0o660
        transport = httpx.AsyncHTTPTransport(uds=str(tmp_path / "dstack.sock"))
        async with httpx.AsyncClient(transport=transport, timeout=30) as c:
            r = (await c.post("http://localhost/GetQuote", json={"report_data": "aa"})).json()
            assert "attestation" not in r  # real tdx: no attestation in GetQuote
            v = verify_quote(
                bytes.fromhex(r["quote"]), tdx.collateral_json(), root_ca_der=tdx.root_ca_der
            )
            assert v.quote.report_data[:1] == b"\xaa"
            events = event_log_from_json(r["event_log"])
            runtime = [e for e in events if e.imr == 3]
            assert [e.event for e in runtime] == ["system-preparing", "app-id"]
            assert all(e.digest == b"" for e in runtime)  # stripped as upstream
            assert (await c.post("http://localhost/GetKey", json={"path": "x"})).status_code == 200
            info = (await c.post("http://localhost/Info", json={})).json()
            assert info.get("app_id") == "01" * 20, info
        assert (rtmr / "rtmr3:sha384").read_bytes() == RuntimeEvent("app-id", b"\x01" * 20).digest()
    finally:
        stop.set()
        await task
        kernel.stop = True


def test_external_http_routes(tmp_path):
    sim = start_simulator(tmp_path / "open")
    try:
        with httpx.Client(timeout=30) as c:
            page = c.get(f"{sim.external}/")
            assert page.status_code == 200 and "<h1>simulator</h1>" in page.text
            metrics = c.get(f"{sim.external}/metrics")
            assert metrics.status_code == 200 and "dstack_memory_bytes" in metrics.text
            assert c.get(f"{sim.external}/logs/bad$name").status_code == 400
    finally:
        sim.stop()
    closed = tmp_path / "closed"
    closed.mkdir()
    compose = {
        **DEFAULT_COMPOSE,
        "name": "private",
        "public_sysinfo": False,
        "public_logs": False,
        "public_tcbinfo": False,
    }
    (closed / "app-compose.json").write_text(json.dumps(compose))
    sim = start_simulator(closed)
    try:
        with httpx.Client(timeout=30) as c:
            assert c.get(f"{sim.external}/metrics").status_code == 403
            assert c.get(f"{sim.external}/logs/app").status_code == 403
            info = c.post(f"{sim.external}/prpc/Worker.Info", json={}).json()
            assert (
                info["tcb_info"] == "" and info["vm_config"] == "" and info["app_name"] == "private"
            )
            internal = httpx.Client(transport=httpx.HTTPTransport(uds=str(sim.dstack_sock)))
            assert internal.post("http://localhost/Info", json={}).json()["tcb_info"]
            internal.close()
    finally:
        sim.stop()


class PublicLogs:
    """the one thing the /logs route asks of the core."""

    def compose_flag(self, name: str, default: bool) -> bool:
        return True


async def test_logs_route_never_passes_a_name_as_an_option(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "podman"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "arg:$a"; done\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    server = PrpcServer()
    add_routes(server.app, PublicLogs())  # type: ignore[arg-type]
    port = await server.listen_tcp("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            for bad in ("-f", "--help", "--since=0", "_x", ".x", "a" * 129, "a b", "é"):
                r = await c.get(f"/logs/{quote(bad, safe='')}")
                assert r.status_code == 400 and "invalid container name" in r.text, bad
            r = await c.get("/logs/app-1_v2.0", params={"tail": "5", "bare": "true"})
            assert r.status_code == 200
            args = [line.removeprefix("arg:") for line in r.text.splitlines()]
            assert args == ["logs", "--tail", "5", "--", "app-1_v2.0"]
            assert (await c.get(f"/logs/{'a' * 128}?bare=true")).text.endswith("a" * 128 + "\n")
            # numbers are non-negative ASCII digits: a negative tail is every line to podman
            # (past the cap), a superscript two an int() error
            for query in ("tail=-1", "tail=%C2%B2", "since=-5", "until=1e3", "tail=+5"):
                r = await c.get(f"/logs/app?{query}")
                assert r.status_code == 400 and "non-negative integers" in r.text, query
            r = await c.get("/logs/app", params={"tail": "99999999", "since": "7", "bare": "1"})
            args = [line.removeprefix("arg:") for line in r.text.splitlines()]
            assert args == ["logs", "--tail", "10000", "--since", "7", "--", "app"]
    finally:
        await server.close()
