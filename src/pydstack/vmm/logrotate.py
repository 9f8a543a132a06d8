"""a CVM's log files (`serial.log`: the guest console, `stdout.log`: the CVM process's output):
every start archives the previous boot's logs, logrotate style (`<name>.1` is the newest of at
most `[cvm.log] max_backups`), and marks the new boot in the console log.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

SERIAL_LOG = "serial.log"
STDOUT_LOG = "stdout.log"
LOGS = (SERIAL_LOG, STDOUT_LOG)


def rotate(path: Path, backups: int) -> None:
    """keep `backups` previous versions of `path` (0: the old log is truncated away); an
    absent or empty log is left as it is."""
    if not path.exists() or path.stat().st_size == 0:
        return
    for i in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
    if backups > 0:
        os.replace(path, path.with_name(f"{path.name}.1"))
    else:
        path.write_bytes(b"")


def start_boot_logs(vm_dir: Path, backups: int, now: float | None = None) -> None:
    """before a boot: archive the last boot's logs and write the boot separator line."""
    for name in LOGS:
        rotate(vm_dir / name, backups)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    with open(vm_dir / SERIAL_LOG, "ab") as f:
        f.write(f"===== boot @ {stamp} =====\n".encode())
