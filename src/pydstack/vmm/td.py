"""the simulated TD of a CVM without TDX, held by the VMM as a TDX module and a quoting enclave
would hold it.

A CVM boots with a fresh TD: MRTD and RTMR0-2 from its OS image, MRCONFIGID (v1) over its
compose hash, RTMR3 zero. Through its own host-API channel the CVM may extend RTMR3 with runtime
events and ask for quotes over its report data (:class:`TdxHostImpl`); the quote-signing key,
the seed it comes from and every other register stay in the VMM, so nothing inside the CVM,
root included, can produce a quote with other measurements.

The runtime events are kept in `td-state.json` in the VM's directory (outside the host share,
0600), so a VMM that restarts while the CVM runs resumes its TD where it was.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.empty_pb2 import Empty

from pydstack.attest.eventlog import RuntimeEvent, event_log_to_json
from pydstack.attest.identity import mr_config_id_v1
from pydstack.errors import ConfigError, InputError
from pydstack.rpc.proto import host_api_pb2 as hpb
from pydstack.rpc.server import CallContext
from pydstack.tee.simulated import SimulatedTdx
from pydstack.types import jsonlimits
from pydstack.types.capped import read_capped

from .workdir import atomic_write

log = logging.getLogger(__name__)

STATE_FILE = "td-state.json"
#: bounds on what a CVM may measure in one boot (the boot flow uses about a dozen events)
MAX_EVENTS = 1024
MAX_EVENT_NAME = 128
MAX_EVENT_PAYLOAD = 4096
MAX_STATE_FILE = 16 * 1024 * 1024
TDX_HOST = hpb.DESCRIPTOR.services_by_name["TdxHost"]


class TdError(InputError):
    """a CVM asked its TD for something a TD does not do."""


@dataclass(frozen=True)
class TdIdentity:
    """what fixes a TD's build-time registers: the OS image and the compose hash."""

    os_image: str
    compose_hash: bytes

    def to_json(self) -> dict[str, str]:
        return {"os_image": self.os_image, "compose_hash": self.compose_hash.hex()}


class VmTd:
    """one CVM's TD: build-time registers fixed at creation, RTMR3 extended by the CVM."""

    def __init__(self, seed: bytes, identity: TdIdentity, state_path: Path) -> None:
        if len(identity.compose_hash) != 32:
            raise ValueError("the compose hash of a td must be 32 bytes")
        self.identity = identity
        self.state_path = state_path
        self._tdx = SimulatedTdx(
            seed,
            os_image=identity.os_image,
            mr_config_id=mr_config_id_v1(identity.compose_hash),
        )
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- lifecycle
    @classmethod
    def fresh(cls, seed: bytes, identity: TdIdentity, state_path: Path) -> VmTd:
        """a TD for a CVM that is about to boot (RTMR3 zero); replaces any earlier state."""
        td = cls(seed, identity, state_path)
        td._save()
        return td

    @classmethod
    def resume(cls, seed: bytes, state_path: Path) -> VmTd:
        """the TD of a CVM still running after a VMM restart, rebuilt from its saved events."""
        with open(state_path, "rb") as f:
            raw = read_capped(f, MAX_STATE_FILE)
        if len(raw) > MAX_STATE_FILE:
            raise ValueError(f"{state_path.name} is too large")
        doc = jsonlimits.loads(raw)
        if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
            raise ValueError(f"{state_path.name} is not a td state")
        identity = TdIdentity(str(doc["os_image"]), bytes.fromhex(str(doc["compose_hash"])))
        td = cls(seed, identity, state_path)
        for line in doc["events"]:
            td._tdx.extend_rtmr3(RuntimeEvent.from_log_line(str(line)))
        return td

    def _save(self) -> None:
        doc = {
            **self.identity.to_json(),
            "events": [ev.to_log_line() for ev in self._tdx.runtime_events()],
        }
        atomic_write(self.state_path, json.dumps(doc).encode(), 0o600)

    # ---------------------------------------------------------------- what the cvm may do
    def extend_rtmr3(self, event: RuntimeEvent) -> None:
        if not event.event or len(event.event.encode()) > MAX_EVENT_NAME:
            raise TdError(f"runtime event name must be 1 to {MAX_EVENT_NAME} bytes")
        if len(event.payload) > MAX_EVENT_PAYLOAD:
            raise TdError(f"runtime event payload exceeds {MAX_EVENT_PAYLOAD} bytes")
        if event.version not in (1, 2):
            raise TdError(f"unsupported runtime event version {event.version}")
        with self._lock:
            if len(self._tdx.runtime_events()) >= MAX_EVENTS:
                raise TdError(f"rtmr3 already holds {MAX_EVENTS} events")
            self._tdx.extend_rtmr3(event)
            self._save()

    def quote(self, report_data: bytes) -> tuple[bytes, str]:
        """a quote over `report_data` and the event log it was taken with."""
        if len(report_data) > 64:
            raise TdError("report data is longer than 64 bytes")
        with self._lock:
            quote = self._tdx.get_quote(report_data)
            events = self._tdx.event_log()
        return quote, event_log_to_json(events)

    def event_log_json(self) -> str:
        with self._lock:
            return event_log_to_json(self._tdx.event_log())

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return self._tdx.rtmrs()

    @property
    def mrtd(self) -> bytes:
        return self._tdx.mrtd


class TdxHostImpl:
    """the TdxHost service on one CVM's host-API socket (the socket identifies the CVM)."""

    def __init__(self, current: Callable[[], VmTd | None]) -> None:
        self.current = current  # the cvm's td of this boot (a new one each boot)

    def _td(self) -> VmTd:
        td = self.current()
        if td is None:
            raise TdError("this cvm has no td (it is not running under the simulated tdx)")
        return td

    async def ExtendRtmr(self, req: hpb.TdExtendRequest, ctx: CallContext) -> Empty:
        if req.rtmr != 3:
            raise TdError(f"rtmr{req.rtmr} cannot be extended at runtime: only rtmr3")
        version = req.version or 1
        self._td().extend_rtmr3(RuntimeEvent(req.event, req.payload, version))
        return Empty()

    async def GetQuote(self, req: hpb.TdQuoteRequest, ctx: CallContext) -> hpb.TdQuoteResponse:
        quote, event_log = self._td().quote(req.report_data)
        return hpb.TdQuoteResponse(quote=quote, event_log=event_log)

    async def GetEventLog(self, _: Empty, ctx: CallContext) -> hpb.TdEventLog:
        return hpb.TdEventLog(event_log=self._td().event_log_json())


def read_seed_file(path: Path) -> bytes:
    """a 32-byte seed stored as hex; ConfigError for a file others may read, or a bad one."""
    try:
        st = path.stat()
        text = path.read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the mock attestation seed {path}: {e.strerror}") from e
    if st.st_mode & 0o077:
        raise ConfigError(
            f"the mock attestation seed {path} is readable by others "
            f"(mode {st.st_mode & 0o777:o}); chmod 600 it"
        )
    try:
        seed = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise ConfigError(f"the mock attestation seed {path} must hold 32 bytes of hex")
    return seed


def stored_seed(configured: bytes, seed_file: Path | None, run_path: Path) -> bytes:
    """the seed of the simulated TDX's mock PKI: `configured` (`mock_attestation_seed`), else
    from `seed_file` (`mock_attestation_seed_file`), else a random one kept next to the run
    path (0600); never inside a CVM's reach."""
    if configured:
        return configured
    if seed_file is not None:
        return read_seed_file(seed_file)
    path = run_path.parent / "mock-attestation-seed"
    if path.exists():
        return read_seed_file(path)
    seed = os.urandom(32)
    atomic_write(path, seed.hex().encode(), 0o600)
    log.warning(
        "no [cvm.tee_simulator] mock_attestation_seed_file configured; generated one in %s", path
    )
    return seed
