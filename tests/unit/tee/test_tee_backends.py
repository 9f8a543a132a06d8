"""the simulated and the real tdx backends."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pydstack.attest.eventlog import RuntimeEvent, replay_rtmrs, replay_runtime_events
from pydstack.attest.quote import parse_quote
from pydstack.tee.mockpki import MockPki
from pydstack.tee.real import ConfigfsTsm, RealTdx, RuntimeEventLog, TdxError, read_ccel
from pydstack.tee.simulated import SimulatedTdx


def test_simulated_state_and_event_log_agree():
    tdx = SimulatedTdx(bytes(32), os_image="img-a")
    for name in ("system-preparing", "app-id", "compose-hash"):
        tdx.extend_rtmr3(RuntimeEvent(name, name.encode()))
    report = parse_quote(tdx.get_quote(b"abc")).td_report
    assert report is not None
    assert report.report_data == b"abc".ljust(64, b"\0")
    assert replay_rtmrs(tdx.event_log()) == report.rtmrs == tdx.rtmrs()
    assert replay_runtime_events(tdx.runtime_events()) == report.rtmr3
    assert report.mr_td == SimulatedTdx(bytes(32), os_image="img-a").mrtd
    assert report.mr_td != SimulatedTdx(bytes(32), os_image="img-b").mrtd
    with pytest.raises(ValueError):
        tdx.get_quote(b"x" * 65)


def test_rtmr3_extension_is_atomic_under_threads():
    tdx = SimulatedTdx(bytes(32))

    def work(i: int) -> None:
        for j in range(50):
            tdx.extend_rtmr3(RuntimeEvent(f"e{i}", str(j).encode()))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(tdx.runtime_events()) == 200
    assert replay_runtime_events(tdx.runtime_events()) == tdx.rtmrs()[3]


def test_mock_pki_is_deterministic_per_seed():
    a, b = MockPki(b"\x01" * 32), MockPki(b"\x01" * 32)
    assert a.root_ca_der == b.root_ca_der
    assert a.pck_chain_pem == b.pck_chain_pem
    assert MockPki(b"\x02" * 32).root_ca_der != a.root_ca_der
    with pytest.raises(ValueError):
        MockPki(b"short")


class FakeTsm:
    """a configfs-tsm report directory whose 'kernel' answers inblob writes from a thread."""

    def __init__(self, root: Path, quote_for: bytes) -> None:
        self.root = root
        (root / "provider").write_text("tdx_guest\n")
        (root / "generation").write_text("0\n")
        (root / "inblob").write_bytes(b"")
        (root / "outblob").write_bytes(b"")
        self.quote = quote_for
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        seen = b""
        while not self.stop:
            data = (self.root / "inblob").read_bytes()
            if data and data != seen:
                seen = data
                (self.root / "outblob").write_bytes(self.quote + data)
                gen = int((self.root / "generation").read_text())
                (self.root / "generation").write_text(f"{gen + 1}\n")
            time.sleep(0.005)


def test_configfs_tsm_flow(tmp_path):
    fake = FakeTsm(tmp_path, b"Q" * 2000)
    try:
        tsm = ConfigfsTsm(tmp_path)
        quote = tsm.get_quote(b"\x07" * 64)
        assert quote == b"Q" * 2000 + b"\x07" * 64
        assert (tmp_path / "generation").read_text().strip() == "1"
        with pytest.raises(ValueError):
            tsm.get_quote(b"short")
    finally:
        fake.stop = True
    (tmp_path / "provider").write_text("sev_guest\n")
    with pytest.raises(TdxError, match="unexpected tsm provider"):
        ConfigfsTsm(tmp_path).get_quote(bytes(64))


def test_configfs_tsm_timeout(tmp_path):
    (tmp_path / "provider").write_text("tdx_guest\n")
    (tmp_path / "generation").write_text("3\n")
    with pytest.raises(TdxError, match="timed out"):
        ConfigfsTsm(tmp_path, poll_timeout=0.05).get_quote(bytes(64))


def test_real_backend_event_log(tmp_path, vectors, monkeypatch):
    monkeypatch.setenv("DSTACK_CCEL_FILE", str(vectors / "dstack/ccel.bin"))
    rtmr_dir = tmp_path / "measurements"
    rtmr_dir.mkdir()
    (rtmr_dir / "rtmr3:sha384").write_bytes(b"")
    monkeypatch.setenv("DCAP_TDX_RTMR_SYSFS_PATH", str(rtmr_dir))
    log = RuntimeEventLog(tmp_path / "log")
    tdx = RealTdx(ConfigfsTsm(tmp_path / "tsm"), log)
    ev = RuntimeEvent("app-id", b"\x01" * 20)
    tdx.extend_rtmr3(ev)
    assert (rtmr_dir / "rtmr3:sha384").read_bytes() == ev.digest()
    assert (log.log.stat().st_mode & 0o777) == 0o600
    assert tdx.runtime_events() == [ev]
    events = tdx.event_log()
    assert len(events) == len(read_ccel()) + 1 and events[-1].event == "app-id"
    monkeypatch.setenv("DCAP_TDX_RTMR_SYSFS_PATH", "relative/path")
    with pytest.raises(TdxError, match="absolute"):
        tdx.extend_rtmr3(ev)
