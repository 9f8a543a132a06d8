"""a short run of every fuzz target finds nothing (the long runs are in fuzz/README.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuzz
REPO = Path(__file__).resolve().parents[2]
RUNS = 100


def test_every_target_runs_without_findings(tmp_path):
    names = subprocess.run(
        [sys.executable, str(REPO / "fuzz" / "run.py"), "--list"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert len(names) >= 20
    proc = subprocess.run(
        [sys.executable, str(REPO / "fuzz" / "run.py"), "--runs", str(RUNS), "--jobs", "2",
         "--corpus", str(tmp_path / "corpus"), "--findings", str(tmp_path / "findings"),
         "--logs", str(tmp_path / "logs")],
        capture_output=True, text=True, check=False, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[2:] if line}
    for name in names:
        assert int(rows[name][1]) >= RUNS, rows[name]  # inputs tried
        assert int(rows[name][2]) > 0, rows[name]  # coverage of pydstack code
        assert rows[name][-1] == "none" or rows[name][-2:] == ["known", "1"], rows[name]
