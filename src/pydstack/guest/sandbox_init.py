"""PID 1 of a sandbox CVM: name the host, run the guest (`pydstack.guest.sandbox`) as its child,
reap orphans, pass SIGTERM/SIGINT on.

Kept to the standard library so the process that lives as long as the CVM stays small (the
guest itself loads the crypto and RPC stacks).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys


def _hostname(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--hostname" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--hostname="):
            return arg.split("=", 1)[1]
    return ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = _hostname(argv)
    if name and os.getpid() == 1:
        socket.sethostname(name)  # its own uts namespace
    child = subprocess.Popen([sys.executable, "-m", "pydstack.guest.sandbox", *argv, "--child"])

    def forward(sig: int, _: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 1
        except InterruptedError:
            continue
        if pid == child.pid:
            return os.waitstatus_to_exitcode(status) & 0xFF


if __name__ == "__main__":
    sys.exit(main())
