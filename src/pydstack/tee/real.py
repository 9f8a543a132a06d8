"""real Intel TDX inside a guest: quotes via configfs-tsm, RTMR extension via sysfs or the
`/dev/tdx_guest` ioctl, the boot event log from the ACPI CCEL table, and the runtime event log
file that pairs with RTMR3.

Paths follow upstream and honour its overrides: `DCAP_TDX_QUOTE_CONFIGFS_PATH`,
`DCAP_TDX_RTMR_SYSFS_PATH`, `DSTACK_CCEL_FILE`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import time
from pathlib import Path

from pydstack.attest.eventlog import RuntimeEvent, TdxEvent, parse_ccel
from pydstack.errors import DstackError

log = logging.getLogger(__name__)

CONFIGFS_TSM = Path("/sys/kernel/config/tsm/report/com.intel.dcap")
RTMR_SYSFS = Path("/sys/devices/virtual/misc/tdx_guest/measurements")
TDX_GUEST_DEVICE = Path("/dev/tdx_guest")
CCEL_FILE = Path("/sys/firmware/acpi/tables/data/CCEL")
RUNTIME_EVENT_DIR = Path("/run/log/dstack")
MIN_QUOTE_LEN = 1020
MAX_QUOTE_LEN = 8192

# _IOR('T', 3, struct {u8 data[48]; u8 index;}) : extend an RTMR through the tdx_guest driver
_IOC_READ = 2
TDX_CMD_EXTEND_RTMR = (_IOC_READ << 30) | (49 << 16) | (ord("T") << 8) | 3


class TdxError(DstackError):
    """the TDX guest interfaces failed."""


def _env_path(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    if value:
        path = Path(value)
        if not path.is_absolute():
            raise TdxError(f"{var} must be an absolute path")
        return path
    return default


def tdx_available() -> bool:
    return (
        TDX_GUEST_DEVICE.exists()
        or _env_path("DCAP_TDX_QUOTE_CONFIGFS_PATH", CONFIGFS_TSM).exists()
    )


class ConfigfsTsm:
    """one configfs-tsm report entry: write report data to inblob, read the quote from outblob."""

    def __init__(self, path: Path | None = None, *, poll_timeout: float = 5.0) -> None:
        self.path = path or _env_path("DCAP_TDX_QUOTE_CONFIGFS_PATH", CONFIGFS_TSM)
        self.poll_timeout = poll_timeout
        self._lock = threading.Lock()

    def _generation(self) -> int:
        try:
            return int((self.path / "generation").read_text().strip())
        except (OSError, ValueError) as e:
            raise TdxError(f"cannot read tsm generation: {e}") from e

    def get_quote(self, report_data: bytes) -> bytes:
        if len(report_data) != 64:
            raise ValueError("report data must be 64 bytes")
        with self._lock:
            provider = (self.path / "provider").read_text().strip()
            if not provider.startswith("tdx_guest"):
                raise TdxError(f"unexpected tsm provider {provider!r}")
            with open(self.path / "inblob", "wb") as inblob:
                fcntl.flock(inblob, fcntl.LOCK_EX)
                before = self._generation()
                inblob.write(report_data)
                inblob.flush()
                deadline = time.monotonic() + self.poll_timeout
                while (gen := self._generation()) == before:
                    if time.monotonic() > deadline:
                        raise TdxError("timed out waiting for the tsm report")
                    time.sleep(0.01)
                if gen != before + 1:
                    raise TdxError(f"tsm generation jumped from {before} to {gen}: concurrent use")
                quote = (self.path / "outblob").read_bytes()
                if self._generation() != gen:
                    raise TdxError("tsm report changed while it was read")
        if not MIN_QUOTE_LEN < len(quote) < MAX_QUOTE_LEN:
            raise TdxError(f"tsm returned a quote of implausible size {len(quote)}")
        return quote


def extend_rtmr(index: int, digest: bytes) -> None:
    """extend RTMR `index` (0-3) with a 48-byte digest (sysfs, else the ioctl)."""
    if not 0 <= index <= 3:
        raise ValueError("rtmr index must be 0..3")
    if len(digest) != 48:
        raise ValueError("rtmr digest must be 48 bytes")
    sysfs = _env_path("DCAP_TDX_RTMR_SYSFS_PATH", RTMR_SYSFS) / f"rtmr{index}:sha384"
    if sysfs.exists():
        with open(sysfs, "wb") as f:
            f.write(digest)
        return
    if not TDX_GUEST_DEVICE.exists():
        raise TdxError("no rtmr interface: neither sysfs measurements nor /dev/tdx_guest")
    buf = bytearray(struct.pack("48sB", digest, index))
    with open(TDX_GUEST_DEVICE, "rb+", buffering=0) as dev:
        fcntl.ioctl(dev, TDX_CMD_EXTEND_RTMR, buf)


def read_ccel(path: Path | None = None) -> list[TdxEvent]:
    p = path or _env_path("DSTACK_CCEL_FILE", CCEL_FILE)
    with open(p, "rb") as f:
        data = f.read(16 * 1024 * 1024)
    return parse_ccel(data)


class RuntimeEventLog:
    """the guest's runtime event log (JSON lines, 0600), appended only after RTMR3 moved."""

    def __init__(self, directory: Path = RUNTIME_EVENT_DIR) -> None:
        self.dir = directory
        self.log = directory / "runtime_events.log"
        self.lock = directory / "runtime_event.lock"

    def emit(self, event: RuntimeEvent, extend: bool = True) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if extend:
                extend_rtmr(3, event.digest())
            lfd = os.open(self.log, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
            with os.fdopen(lfd, "a") as f:
                f.write(event.to_log_line() + "\n")
        finally:
            os.close(fd)

    def read(self) -> list[RuntimeEvent]:
        try:
            text = self.log.read_text()
        except FileNotFoundError:
            return []
        return [RuntimeEvent.from_log_line(line) for line in text.splitlines() if line.strip()]


class RealTdx:
    """the TDX platform of a real guest."""

    simulated = False
    in_process = False

    def __init__(
        self, tsm: ConfigfsTsm | None = None, events: RuntimeEventLog | None = None
    ) -> None:
        self.tsm = tsm or ConfigfsTsm()
        self.events = events or RuntimeEventLog()

    def get_quote(self, report_data: bytes) -> bytes:
        return self.tsm.get_quote(report_data.ljust(64, b"\0"))

    def extend_rtmr3(self, event: RuntimeEvent) -> None:
        self.events.emit(event)

    def runtime_events(self) -> list[RuntimeEvent]:
        return self.events.read()

    def event_log(self) -> list[TdxEvent]:
        return read_ccel() + [e.to_tdx_event() for e in self.runtime_events()]
