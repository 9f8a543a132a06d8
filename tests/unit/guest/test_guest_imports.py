"""the guest's entry points load no HTTP stack beyond its own, and no library only a later call
needs: aiohttp's import alone is 0.5 s on the host and tens of seconds in a QEMU guest under TCG,
pycryptodome's Keccak (through cffi and pycparser) 75 ms here and over a second there, paid on
every boot."""

from __future__ import annotations

import subprocess
import sys

#: what a guest's start must not load
HEAVY = ("aiohttp", "Crypto", "cffi", "pycparser")


def test_the_guests_do_not_import_aiohttp_or_pycryptodome():
    code = (
        "import sys\n"
        "import pydstack.guest.sandbox, pydstack.guest.qemu, pydstack.guest.sandbox_init\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_keccak_still_loads_when_it_is_used():
    code = (
        "import sys\n"
        "from pydstack.crypto.keccak import keccak256\n"
        "assert 'Crypto' not in sys.modules\n"
        "print(keccak256(b'').hex())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
