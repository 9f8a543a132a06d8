"""the sandbox guest's private /run and /tmp keep the cvm's work dir and the code it runs visible,
wherever they live (a checkout or a run path under /tmp or /run)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SCRIPT = """
import os, sys
from pathlib import Path
sys.path.insert(0, {code!r})
from pydstack.guest import sandbox
vm = sandbox.setup_mounts(Path({wd!r}))
import lateimport  # imported only after the fresh /run and /tmp are mounted
print(lateimport.VALUE, (vm / "shared" / "marker").read_text(), sorted(os.listdir("/tmp")))
"""


@pytest.mark.parametrize("base", ["/run", "/tmp"])
def test_work_dir_and_code_survive_the_private_mounts(base):
    root = Path(base) / f"pydstack-mounts-{uuid.uuid4().hex[:8]}"
    code, wd = root / "code", root / "vm"
    try:
        code.mkdir(parents=True)
        (code / "lateimport.py").write_text("VALUE = 'code-visible'\n")
        for d in ("shared", "host-api", "guest-api"):
            (wd / d).mkdir(parents=True)
        (wd / "shared" / "marker").write_text("wd-visible")
        out = subprocess.run(
            ["unshare", "--mount", "--uts", "--fork", sys.executable, "-c",
             SCRIPT.format(code=str(code), wd=str(wd))],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        value, marker, listing = out.stdout.split(" ", 2)
        assert (value, marker) == ("code-visible", "wd-visible")
        # /tmp is the cvm's own: only what had to stay visible is there
        assert "pydstack-mounts" not in listing or base == "/tmp"
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)
