"""the README's main job runs end to end."""

from __future__ import annotations

import subprocess
import sys


def test_demo_main_job(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pydstack.demo", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("[ok]") == 4 and "FAILED" not in out.stdout
    assert (tmp_path / "demo/mock-root-ca.der").is_file()
