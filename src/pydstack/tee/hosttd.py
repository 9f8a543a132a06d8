"""a TD kept by the host: the guest side of the VMM's `TdxHost` service.

A CVM without TDX hardware has its simulated TD in its VMM (:mod:`pydstack.vmm.td`); this is
how the guest uses it, over its own host-API socket: extend RTMR3, get a quote over report data,
read the event log. It offers the same surface as the other TDX backends, so the boot flow and
the guest agent do not know where their TD lives. Calls are synchronous (the boot flow and the
agent call their platform from worker threads) and use the prpc JSON encoding. The channel is a
Unix socket path (sandbox CVMs) or an `http://host:port` base (a VM's per-VM forward to its
VMM's socket).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import urllib.parse
from pathlib import Path

from pydstack.attest.errors import ParseError
from pydstack.attest.eventlog import (
    RuntimeEvent,
    TdxEvent,
    event_log_from_json,
    runtime_events_of,
)
from pydstack.errors import UnavailableError
from pydstack.rpc.unixpath import SocketPath

MAX_RESPONSE = 8 * 1024 * 1024
SERVICE_PREFIX = "/tdx"


class HostTdError(UnavailableError):
    """the host's TD refused or could not be reached; the message says why."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        with SocketPath(self._path) as addr:
            sock.connect(addr.address)
        self.sock = sock


class HostTdx:
    """the TD of this CVM, as its VMM keeps it."""

    simulated = True

    def __init__(self, socket_path: Path | str, timeout: float = 30.0) -> None:
        """`socket_path`: a Unix socket, or an `http://host:port` base; ValueError for another
        URL."""
        self.socket_path = socket_path
        self.timeout = timeout
        self._lock = threading.Lock()
        self._log: list[TdxEvent] | None = None  # valid until the next extend
        self._http: tuple[str, int] | None = None
        if isinstance(socket_path, str):
            parsed = urllib.parse.urlsplit(socket_path)
            if parsed.scheme != "http" or not parsed.hostname or not parsed.port:
                raise ValueError(f"the host td address must be http://host:port: {socket_path!r}")
            self._http = (parsed.hostname, parsed.port)

    def _connection(self) -> http.client.HTTPConnection:
        if self._http is not None:
            return http.client.HTTPConnection(*self._http, timeout=self.timeout)
        return _UnixConnection(Path(self.socket_path), self.timeout)

    def _call(self, method: str, body: dict[str, object]) -> dict[str, object]:
        conn = self._connection()
        try:
            conn.request(
                "POST",
                f"{SERVICE_PREFIX}/{method}?json",
                body=json.dumps(body),
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            data = resp.read(MAX_RESPONSE + 1)
        except OSError as e:
            raise HostTdError(f"the host's td is unreachable: {e}") from e
        finally:
            conn.close()
        if len(data) > MAX_RESPONSE:
            raise HostTdError(f"the host's td answered {method} with too much data")
        try:
            obj = json.loads(data) if data.strip() else {}
        except ValueError:
            obj = None
        if resp.status != 200:
            err = obj.get("error") if isinstance(obj, dict) else None
            raise HostTdError(f"the host's td refused {method}: {err or f'http {resp.status}'}")
        if obj is None:
            return {}
        if not isinstance(obj, dict):
            raise HostTdError(f"the host's td answered {method} with a non-object")
        return obj

    def _parse_log(self, text: object) -> list[TdxEvent]:
        if not isinstance(text, str):
            raise HostTdError("the host's td sent no event log")
        try:
            return event_log_from_json(text)
        except ParseError as e:
            raise HostTdError(f"the host's td sent an invalid event log: {e}") from e

    # ---------------------------------------------------------------- the platform surface
    def extend_rtmr3(self, event: RuntimeEvent) -> None:
        with self._lock:
            self._log = None
            self._call(
                "ExtendRtmr",
                {
                    "rtmr": 3,
                    "event": event.event,
                    "payload": event.payload.hex(),
                    "version": event.version,
                },
            )

    def get_quote(self, report_data: bytes) -> bytes:
        if len(report_data) > 64:
            raise ValueError("report data is longer than 64 bytes")
        resp = self._call("GetQuote", {"report_data": report_data.hex()})
        try:
            quote = bytes.fromhex(str(resp.get("quote", "")))
        except ValueError as e:
            raise HostTdError("the host's td sent a quote that is not hex") from e
        log = self._parse_log(resp.get("event_log"))
        with self._lock:
            self._log = log
        return quote

    def event_log(self) -> list[TdxEvent]:
        with self._lock:
            if self._log is not None:
                return list(self._log)
        log = self._parse_log(self._call("GetEventLog", {}).get("event_log"))
        with self._lock:
            self._log = log
        return list(log)

    def runtime_events(self) -> list[RuntimeEvent]:
        return runtime_events_of(self.event_log())
