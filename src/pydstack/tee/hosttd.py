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
from pydstack.types import jsonlimits
from pydstack.types.capped import read_capped

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
    in_process = False

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
            data = read_capped(resp, MAX_RESPONSE)
        except OSError as e:
            raise HostTdError(f"the host's td is unreachable: {e}") from e
        finally:
            conn.close()
        return parse_response(method, resp.status, data)

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
        quote, log = parse_quote_response(
            self._call("GetQuote", {"report_data": report_data.hex()})
        )
        with self._lock:
            self._log = log
        return quote

    def event_log(self) -> list[TdxEvent]:
        with self._lock:
            if self._log is not None:
                return list(self._log)
        log = parse_event_log(self._call("GetEventLog", {}).get("event_log"))
        with self._lock:
            self._log = log
        return list(log)

    def runtime_events(self) -> list[RuntimeEvent]:
        return runtime_events_of(self.event_log())


def parse_response(method: str, status: int, data: bytes) -> dict[str, object]:
    """the JSON object the host's TD answered `method` with (HTTP `status`, body `data`;
    `null` or nothing: an empty object). HostTdError when it refused (its error quoted, cut to
    200 characters), or the answer is over `MAX_RESPONSE`, not JSON within `jsonlimits`'
    bounds, or not an object. Linear time."""
    if len(data) > MAX_RESPONSE:
        raise HostTdError(f"the host's td answered {method} with too much data")
    try:
        obj = jsonlimits.loads(data) if data.strip() else {}
        valid = True
    except jsonlimits.JsonError:
        obj, valid = None, False
    if status != 200:
        err = obj.get("error") if isinstance(obj, dict) else None
        why = str(err)[:200] if err else f"http {status}"
        raise HostTdError(f"the host's td refused {method}: {why}")
    if not valid:
        raise HostTdError(f"the host's td answered {method} with invalid json")
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise HostTdError(f"the host's td answered {method} with a non-object")
    return obj


def parse_event_log(text: object) -> list[TdxEvent]:
    """the event log of a GetQuote or GetEventLog answer; HostTdError if it is not one."""
    if not isinstance(text, str):
        raise HostTdError("the host's td sent no event log")
    try:
        return event_log_from_json(text)
    except ParseError as e:
        raise HostTdError(f"the host's td sent an invalid event log: {e}") from e


def parse_quote_response(resp: dict[str, object]) -> tuple[bytes, list[TdxEvent]]:
    """the quote and event log of a GetQuote answer; HostTdError if they are malformed."""
    try:
        quote = bytes.fromhex(str(resp.get("quote", "")))
    except ValueError as e:
        raise HostTdError("the host's td sent a quote that is not hex") from e
    return quote, parse_event_log(resp.get("event_log"))
