"""the guest's entry points load no HTTP stack beyond its own: aiohttp's import alone is 0.5 s on
the host and tens of seconds in a QEMU guest under TCG, paid on every boot."""

from __future__ import annotations

import subprocess
import sys


def test_the_guests_do_not_import_aiohttp():
    code = (
        "import sys\n"
        "import pydstack.guest.sandbox, pydstack.guest.qemu, pydstack.guest.sandbox_init\n"
        "print(sorted(m for m in sys.modules if m == 'aiohttp' or m.startswith('aiohttp.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
