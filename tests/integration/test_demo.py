"""the README's main job runs end to end: local kms + vmm deploying the sample app."""

from __future__ import annotations

import subprocess
import sys

from pydstack.devstack import free_port


def test_demo_main_job(tmp_path):
    out = subprocess.run(
        [
            sys.executable, "-m", "pydstack.demo", "--dir", str(tmp_path / "demo"),
            "--port", str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("[ok]") == 5 and "FAILED" not in out.stdout
    assert "boot: done" in out.stdout and "Created VM" not in out.stderr
    assert (tmp_path / "demo/mock-root-ca.der").is_file()
    # the stack cleaned up after itself: no cvm left behind
    assert not any((tmp_path / "demo/run/vm").iterdir())
