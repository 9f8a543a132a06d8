"""unix socket paths longer than sun_path allows (108 bytes on Linux).

A VM's sockets live in its work directory, whose path can be long. Binding or connecting through
`/proc/self/fd/<dir fd>/<name>` keeps the address short while naming the same file.
"""

from __future__ import annotations

import os
from pathlib import Path

#: leave room below the 108-byte sun_path for the terminating NUL
MAX_SUN_PATH = 100


class SocketPath:
    """a usable address for `path`; keep it open while connecting or binding."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        self._fd: int | None = None
        if len(os.fsencode(str(p))) <= MAX_SUN_PATH:
            self.address = str(p)
        else:
            self._fd = os.open(p.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self.address = f"/proc/self/fd/{self._fd}/{p.name}"
            if len(os.fsencode(self.address)) > MAX_SUN_PATH:
                self.close()
                raise OSError(f"socket file name too long: {p.name}")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SocketPath:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
