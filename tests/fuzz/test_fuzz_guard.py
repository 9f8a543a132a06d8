"""the fuzz guard reports each kind of finding, deduplicated, and the run goes on after one."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuzz.harness import Guard, Known, Limits, Target
from fuzz.mutators import BINARY

from . import toy_targets

pytestmark = pytest.mark.fuzz
REPO = Path(__file__).resolve().parents[2]
TOYS = Path(toy_targets.__file__)


def _target(call, allowed=(ValueError,), known=()) -> Target:
    return Target("toy", "", lambda: call, allowed, lambda: [], BINARY, known=known)


def test_allowed_errors_are_no_finding(tmp_path):
    guard = Guard(_target(toy_targets.refuse), toy_targets.refuse, findings_dir=tmp_path)
    for data in (b"a", b"bb", b""):
        guard(data)
    assert guard.inputs == 3 and guard.findings == {}
    assert not list(tmp_path.glob("exception-*"))


def test_an_exception_is_one_finding_however_many_inputs_raise_it(tmp_path):
    call = toy_targets.raise_key_error
    guard = Guard(_target(call), call, findings_dir=tmp_path)
    for data in (b"a", b"bb", b"ccc"):
        guard(data)
    (finding,) = guard.findings.values()
    assert finding.kind == "exception" and finding.hits == 3
    assert finding.key.startswith("KeyError @ ")
    saved = tmp_path / finding.file
    assert saved.read_bytes() == b"a"  # the first input that showed it
    note = saved.with_suffix(".txt").read_text()
    assert "KeyError" in note and "fuzz/run.py --target toy --repro" in note


def test_known_findings_are_marked(tmp_path):
    call = toy_targets.hog
    known = (Known("memory", "", "a toy's known hog"),)  # where: outside pydstack
    # time is not what this test is about: zeroing 48 MiB on a loaded machine may pass 50 ms
    relaxed = Limits(fixed_ms=600_000.0)
    guard = Guard(_target(call, known=known), call, limits=relaxed, findings_dir=tmp_path)
    guard(b"x")
    (finding,) = guard.findings.values()
    assert (finding.kind, finding.known) == ("memory", "a toy's known hog")


def test_the_bounds_grow_with_the_input():
    limits = Limits()
    assert limits.time_budget(0) == pytest.approx(0.05)
    assert limits.time_budget(10 * 1024) == pytest.approx(1.05)
    assert limits.mem_budget(0) == 16 * 1024 * 1024
    assert limits.mem_budget(1024) == 16 * 1024 * 1024 + 20 * 1024


def _run(tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "fuzz" / "run.py"), "--module", str(TOYS),
         "--corpus", str(tmp_path / "corpus"), "--findings", str(tmp_path / "findings"),
         "--logs", str(tmp_path / "logs"), *args],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip


def test_each_misbehaviour_is_reported_as_its_kind(tmp_path):
    proc = _run(
        tmp_path, "--runs", "3", "--jobs", "2", "--max-restarts", "1",
        *("--target", "toy_refuses", "--target", "toy_raises", "--target", "toy_slow"),
        *("--target", "toy_memory", "--target", "toy_crash"),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("toy_")}
    assert rows["toy_refuses"].endswith("none")
    assert rows["toy_raises"].endswith("exception 1 (3 inputs)")  # deduplicated, run went on
    assert rows["toy_slow"].split()[1] == "3" and "slow 1" in rows["toy_slow"]
    assert "memory 1" in rows["toy_memory"]
    assert "crash" in rows["toy_crash"]
    findings = tmp_path / "findings"
    assert len(list((findings / "toy_raises").glob("exception-*.bin"))) == 1
    assert list((findings / "toy_slow").glob("slow-*.bin"))
    assert list((findings / "toy_memory").glob("memory-*.bin"))
    assert list((findings / "toy_crash").glob("crash-*"))  # libFuzzer's artifact


def test_a_finding_reproduces(tmp_path):
    _run(tmp_path, "--runs", "2", "--target", "toy_raises")
    (saved,) = (tmp_path / "findings" / "toy_raises").glob("exception-*.bin")
    proc = _run(tmp_path, "--target", "toy_raises", "--repro", str(saved))
    assert proc.returncode == 1
    assert "exception" in proc.stdout and "KeyError" in proc.stderr


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize(
    ("how", "ignored"),
    [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["ctrl-c", "sigterm", "ctrl-c-in-a-background-job"],
)
def test_an_interrupted_run_stops_and_reports_what_ran(tmp_path, how, ignored):
    """Ctrl-C (SIGINT to run.py alone, as `kill -INT` sends it) or SIGTERM: the running worker
    stops, no later target starts, the target that ran gets its row, and the status is 130.
    Also for a run a script started with `&`, which inherits SIGINT ignored."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "fuzz" / "run.py"), "--module", str(TOYS),
         "--corpus", str(tmp_path / "corpus"), "--findings", str(tmp_path / "findings"),
         "--logs", str(tmp_path / "logs"), "--seconds", "300", "--jobs", "1",
         "--target", "toy_refuses", "--target", "toy_raises"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_ignore_sigint if ignored else None,
    )  # fmt: skip
    log = tmp_path / "logs" / "toy_refuses.log"
    deadline = time.monotonic() + 120
    while "#" not in (log.read_text() if log.exists() else "").split("$ ")[-1]:
        assert time.monotonic() < deadline, "the first worker never started fuzzing"
        assert proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(how)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the run went on after {how.name}") from None
    assert proc.returncode == 130, out + err
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("toy_")]
    assert rows == ["toy_refuses"]
    assert "interrupted" in err
    assert not (tmp_path / "logs" / "toy_raises.log").exists()  # never started


def _workers_of(tmp_path: Path) -> list[int]:
    """pids of fuzz workers whose command line names this test's directory."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"worker.py" in cmd and str(tmp_path).encode() in cmd:
                pids.append(int(proc.name))
    return pids


def test_workers_stop_when_the_run_is_killed(tmp_path):
    """SIGKILL gives run.py no chance to stop its workers: they stop on their own."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "fuzz" / "run.py"), "--module", str(TOYS),
         "--corpus", str(tmp_path / "corpus"), "--findings", str(tmp_path / "findings"),
         "--logs", str(tmp_path / "logs"), "--seconds", "300", "--target", "toy_refuses"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    log = tmp_path / "logs" / "toy_refuses.log"
    deadline = time.monotonic() + 120
    while "#" not in (log.read_text() if log.exists() else "").split("$ ")[-1]:
        assert time.monotonic() < deadline, "the worker never started fuzzing"
        time.sleep(0.2)
    assert _workers_of(tmp_path)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 60
    while _workers_of(tmp_path):
        assert time.monotonic() < deadline, "the worker outlived its run"
        time.sleep(0.2)
