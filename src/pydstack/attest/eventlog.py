"""TDX event logs: the CCEL boot log, dstack runtime events (RTMR3), replay and JSON forms.

* CCEL: the TCG crypto-agile binary log from the ACPI CCEL table (SHA-384 digests). CC measurement
  register 1..4 is RTMR0..3 (`imr = mr_index - 1`); index 0 (MRTD) records are dropped.
* runtime events: type 0x08000001; V1 digest = sha384(le32(type) || ":" || name || ":" || payload),
  V2 digest = sha384(JCS {"name", "payload" (hex), "type"}); RTMR3 = replay of all of them.
* JSON: upstream's `TdxEvent` objects (`imr, event_type, digest, event, event_payload[, version]
  [, preimage]`, hex lowercase), and the runtime-event log file lines
  (`{"event", "payload" (base64)[, "version": 2]}`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from pydstack.errors import show_value
from pydstack.types import jsonlimits

from .errors import ParseError

RUNTIME_EVENT_TYPE = 0x08000001
EV_NO_ACTION = 0x3
EV_PLATFORM_CONFIG_FLAGS = 0xA
ACPI_DATA = b"ACPI DATA"
ACPI_LABELS = ("acpi-loader", "acpi-rsdp", "acpi-tables")
MR_LEN = 48
MAX_EVENTS = 65536
MAX_EVENT_SIZE = 16 * 1024 * 1024
MAX_EVENT_LOG_JSON = 32 * 1024 * 1024
MAX_EVENT_NAME = 4096
_ALG_SIZES = {0x4: 20, 0xB: 32, 0xC: 48, 0xD: 64, 0x12: 32}
_SHA384 = 0xC
_V1_PREFIX = struct.pack("<I", RUNTIME_EVENT_TYPE) + b":"
#: a CCEL record's register index, event type, digest count and first digest's algorithm
_CCEL_EVENT = struct.Struct("<IIIH")
_U32 = struct.Struct("<I")


class TdxEvent(NamedTuple):
    """one event of a TDX event log. A named tuple, not a dataclass: a log of hundreds of
    events is decoded per verification, and a tuple is built three times faster."""

    imr: int
    event_type: int
    digest: bytes
    event: str
    event_payload: bytes
    version: int = 1
    preimage: bytes | None = None

    def to_json_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "imr": self.imr,
            "event_type": self.event_type,
            "digest": self.digest.hex(),
            "event": self.event,
            "event_payload": self.event_payload.hex(),
        }
        if self.version == 2:
            obj["version"] = 2
        if self.preimage is not None:
            obj["preimage"] = self.preimage.hex()
        return obj

    @classmethod
    def from_json_obj(cls, obj: Any) -> TdxEvent:
        """one decoded JSON event; ParseError if a field is missing or out of range."""
        if not isinstance(obj, dict):
            raise ParseError("event log entry must be an object")
        get = obj.get
        imr: Any = get("imr")
        event_type: Any = get("event_type")
        if not (type(imr) is int or _plain_int(imr)) or not 0 <= imr <= 3:
            raise ParseError(f"event log entry has an invalid imr: {show_value(imr)}")
        if not (type(event_type) is int or _plain_int(event_type)):
            raise ParseError("event log entry has an invalid event_type")
        if not 0 <= event_type <= 0xFFFFFFFF:
            raise ParseError("event log entry has an invalid event_type")
        event = event_name(get("event", ""))
        if "event_payload" not in obj:
            raise ParseError("event log entry has no event_payload")
        version = get("version", 1)
        if version not in (1, 2) or isinstance(version, bool):
            raise ParseError(f"event log entry has an unsupported version: {show_value(version)}")
        preimage = get("preimage")
        return cls(
            imr,
            event_type,
            event_digest(_unhex(get("digest", ""), "digest")),
            event,
            _unhex(obj["event_payload"], "event_payload"),
            version,
            None if preimage is None else _unhex(preimage, "preimage"),
        )

    @property
    def is_runtime(self) -> bool:
        return self.event_type == RUNTIME_EVENT_TYPE

    def to_runtime_event(self) -> RuntimeEvent:
        return RuntimeEvent(self.event, self.event_payload, self.version)


class RuntimeEvent(NamedTuple):
    """one runtime (RTMR3) event; a named tuple for the reason `TdxEvent` is one."""

    event: str
    payload: bytes
    version: int = 1

    def preimage(self) -> bytes:
        if self.version == 2:
            doc = {"name": self.event, "payload": self.payload.hex(), "type": RUNTIME_EVENT_TYPE}
            return json.dumps(
                doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False
            ).encode()
        return _V1_PREFIX + self.event.encode() + b":" + self.payload

    def digest(self) -> bytes:
        return hashlib.sha384(self.preimage()).digest()

    def to_tdx_event(self) -> TdxEvent:
        return TdxEvent(
            imr=3,
            event_type=RUNTIME_EVENT_TYPE,
            digest=self.digest(),
            event=self.event,
            event_payload=self.payload,
            version=self.version,
            preimage=self.preimage() if self.version == 2 else None,
        )

    def to_log_line(self) -> str:
        obj: dict[str, Any] = {
            "event": self.event,
            "payload": base64.b64encode(self.payload).decode(),
        }
        if self.version == 2:
            obj["version"] = 2
        return json.dumps(obj, separators=(",", ":"))

    @classmethod
    def from_log_line(cls, line: str) -> RuntimeEvent:
        """one line of the runtime-event log file; ParseError if it is not one (the JSON
        through `jsonlimits.loads`, the name through `event_name`, the payload strict base64).
        Linear time and memory."""
        try:
            obj = jsonlimits.loads(line)
        except ValueError as e:
            raise ParseError(f"runtime event line is not json: {e}") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
            raise ParseError("runtime event line must be an object with an event name")
        name = event_name(obj["event"])
        payload = obj.get("payload", "")
        if not isinstance(payload, str) or not payload.isascii():
            raise ParseError("runtime event payload must be base64 text")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ParseError(f"runtime event payload is not base64: {e}") from e
        version = obj.get("version", 1)
        if version not in (1, 2):
            raise ParseError(f"unsupported runtime event version {show_value(version)}")
        return cls(name, raw, version)


def _new_event(fields: tuple[int, int, bytes, str, bytes]) -> TdxEvent:
    """a version-1 TdxEvent without a preimage, without the named tuple's keyword handling."""
    return tuple.__new__(TdxEvent, (*fields, 1, None))


def event_name(value: Any) -> str:
    """an event name as every decoder must take it: text that encodes as utf-8 (no lone
    surrogate, which json escapes can carry), at most MAX_EVENT_NAME bytes."""
    if not isinstance(value, str):
        raise ParseError("event name must be a string")
    if value.isascii():  # the common case: no surrogate, one byte a character
        if len(value) > MAX_EVENT_NAME:
            raise ParseError(f"event name longer than {MAX_EVENT_NAME} bytes")
        return value
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ParseError("event name is not valid unicode (lone surrogate)") from None
    if size > MAX_EVENT_NAME:
        raise ParseError(f"event name longer than {MAX_EVENT_NAME} bytes")
    return value


def _plain_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def event_digest(value: bytes) -> bytes:
    """a measurement digest: at most 48 bytes (sha384; shorter ones are zero-padded on extend)."""
    if len(value) > MR_LEN:
        raise ParseError(f"event digest longer than {MR_LEN} bytes")
    return value


def _unhex(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise ParseError(f"{what} must be a hex string")
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError as e:
        raise ParseError(f"{what} is not valid hex") from e


def extend_mr(mr: bytes, digest: bytes) -> bytes:
    """RTMR extension: sha384(mr || digest), the digest right-padded with zeros to 48 bytes."""
    if len(digest) > MR_LEN:
        raise ValueError(f"digest longer than {MR_LEN} bytes")
    return hashlib.sha384(mr + digest.ljust(MR_LEN, b"\0")).digest()


def replay_rtmrs(events: Iterable[TdxEvent]) -> tuple[bytes, bytes, bytes, bytes]:
    """replay each register from 48 zero bytes over its events' digests, in log order."""
    mrs = [bytes(MR_LEN)] * 4
    sha384 = hashlib.sha384
    for ev in events:
        digest, imr = ev.digest, ev.imr
        if not digest and ev.event_type == RUNTIME_EVENT_TYPE:
            digest = ev.to_runtime_event().digest()
        if len(digest) == MR_LEN:
            mrs[imr] = sha384(mrs[imr] + digest).digest()
        else:
            mrs[imr] = extend_mr(mrs[imr], digest)
    return mrs[0], mrs[1], mrs[2], mrs[3]


def replay_runtime_events(events: Iterable[RuntimeEvent], stop_after: str | None = None) -> bytes:
    """RTMR3 from runtime events, optionally stopping after the first event named `stop_after`."""
    mr = bytes(MR_LEN)
    sha384 = hashlib.sha384
    for ev in events:
        if ev.version == 1:  # RuntimeEvent.digest(), inline for the common version
            digest = sha384(_V1_PREFIX + ev.event.encode() + b":" + ev.payload).digest()
        else:
            digest = ev.digest()
        mr = sha384(mr + digest).digest()  # a sha384 digest needs no padding to extend
        if stop_after is not None and ev.event == stop_after:
            break
    return mr


def runtime_events_of(events: Iterable[TdxEvent]) -> list[RuntimeEvent]:
    return [e.to_runtime_event() for e in events if e.is_runtime]


def parse_ccel(data: bytes) -> list[TdxEvent]:
    """parse a CCEL table (TCG crypto-agile log) into TDX events.

    Contract: ParseError for a malformed log (no spec-ID header, more than 16 algorithms, an
    unknown digest algorithm, a truncated record, an event over `MAX_EVENT_SIZE`, more than
    `MAX_EVENTS` events, a register index over 4, a measured event without exactly one
    digest). Lengths are checked before slicing; linear time and memory.
    """
    data = bytes(data)
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise ParseError(f"ccel truncated: {what} needs {n} bytes at offset {pos}")
        out = data[pos : pos + n]
        pos += n
        return out

    def u32(what: str) -> int:
        return int(struct.unpack("<I", take(4, what))[0])

    # the spec-ID header record, in the legacy TCG_PCClientPCREvent form
    u32("header pcr index")
    header_type = u32("header event type")
    if header_type != EV_NO_ACTION:
        raise ParseError(f"ccel does not start with a spec id event (type {header_type:#x})")
    take(20, "header digest")
    header = take(u32("header size"), "spec id event")
    if not header.startswith(b"Spec ID Event03"):
        raise ParseError("ccel spec id event signature is not 'Spec ID Event03'")
    alg_sizes = _spec_id_algorithms(header)
    events: list[TdxEvent] = []
    end = len(data)
    while pos + 4 <= end:
        if pos + _CCEL_EVENT.size <= end:
            # the common record, read at once: one digest of a known algorithm, at most 48
            # bytes, for RTMR0-3, all of it there; any other goes through the checks below
            mr_index, event_type, count, alg = _CCEL_EVENT.unpack_from(data, pos)
            size = alg_sizes.get(alg, _ALG_SIZES.get(alg))
            at = pos + _CCEL_EVENT.size + (size or 0)
            if (
                count == 1
                and size is not None
                and size <= MR_LEN
                and 0 < mr_index <= 4
                and at + 4 <= end
                and len(events) < MAX_EVENTS
            ):
                payload_end = at + 4 + int(_U32.unpack_from(data, at)[0])
                if payload_end - at - 4 <= MAX_EVENT_SIZE and payload_end <= end:
                    digest, payload = data[at - size : at], data[at + 4 : payload_end]
                    events.append(_new_event((mr_index - 1, event_type, digest, "", payload)))
                    pos = payload_end
                    continue
        mr_index = int(struct.unpack("<I", data[pos : pos + 4])[0])
        if mr_index == 0xFFFFFFFF:
            break
        pos += 4
        event_type = u32("event type")
        count = u32("digest count")
        if count > len(alg_sizes) or (count == 0 and event_type != EV_NO_ACTION):
            raise ParseError(f"ccel event has {count} digests")
        digests: list[tuple[int, bytes]] = []
        for _ in range(count):
            alg = int(struct.unpack("<H", take(2, "digest algorithm"))[0])
            size = alg_sizes.get(alg, _ALG_SIZES.get(alg))
            if size is None:
                raise ParseError(f"ccel digest algorithm {alg:#x} is unknown")
            digests.append((alg, take(size, "digest")))
        size = u32("event size")
        if size > MAX_EVENT_SIZE:
            raise ParseError(f"ccel event size {size} too large")
        payload = take(size, "event data")
        if len(events) >= MAX_EVENTS:
            raise ParseError("ccel has too many events")
        if mr_index == 0:
            continue
        if mr_index > 4:
            raise ParseError(f"ccel measurement register index {mr_index} out of range")
        if len(digests) != 1:
            raise ParseError(f"ccel event must carry exactly one digest, has {len(digests)}")
        digest = event_digest(digests[0][1])  # a sha512 digest cannot extend an rtmr
        events.append(TdxEvent(mr_index - 1, event_type, digest, "", payload))
    return label_acpi_events(events)


def _spec_id_algorithms(header: bytes) -> dict[int, int]:
    # signature[16] platformClass u32, versions 3×u8, uintnSize u8, numberOfAlgorithms u32
    if len(header) < 28:
        raise ParseError("ccel spec id event too short")
    (n,) = struct.unpack("<I", header[24:28])
    if n == 0 or n > 16 or 28 + 4 * n > len(header):
        raise ParseError(f"ccel spec id event lists {n} algorithms")
    out: dict[int, int] = {}
    for i in range(n):
        alg, size = struct.unpack("<HH", header[28 + 4 * i : 32 + 4 * i])
        out[int(alg)] = int(size)
    return out


def label_acpi_events(events: Sequence[TdxEvent]) -> list[TdxEvent]:
    """name the three RTMR0 `ACPI DATA` events acpi-loader, acpi-rsdp, acpi-tables."""
    out: list[TdxEvent] = []
    labels = iter(ACPI_LABELS)
    for ev in events:
        if (
            ev.imr == 0
            and ev.event_type == EV_PLATFORM_CONFIG_FLAGS
            and ev.event_payload == ACPI_DATA
            and not ev.event
        ):
            label = next(labels, "")
            ev = TdxEvent(ev.imr, ev.event_type, ev.digest, label, ev.event_payload)
        out.append(ev)
    return out


def _is_acpi_marker(ev: TdxEvent) -> bool:
    return (
        ev.imr == 0 and ev.event_type == EV_PLATFORM_CONFIG_FLAGS and ev.event_payload == ACPI_DATA
    )


def _strip_runtime(ev: TdxEvent) -> TdxEvent:
    preimage = ev.preimage
    if ev.version == 2 and preimage is None:
        preimage = ev.to_runtime_event().preimage()
    return TdxEvent(ev.imr, ev.event_type, b"", ev.event, ev.event_payload, ev.version, preimage)


def strip_event_log(events: Iterable[TdxEvent]) -> list[TdxEvent]:
    """the GetQuote form: boot events keep digests and lose payloads (except the ACPI DATA
    markers); runtime events keep payloads and lose digests."""
    out = []
    for ev in events:
        if ev.is_runtime:
            out.append(_strip_runtime(ev))
        elif _is_acpi_marker(ev):
            out.append(TdxEvent(ev.imr, ev.event_type, ev.digest, ev.event, ACPI_DATA))
        else:
            out.append(TdxEvent(ev.imr, ev.event_type, ev.digest, ev.event, b""))
    return out


def strip_for_certificate(events: Iterable[TdxEvent]) -> list[TdxEvent]:
    """the RA-TLS form: only the ACPI DATA markers and the stripped RTMR3 events remain."""
    out = []
    for ev in events:
        if _is_acpi_marker(ev):
            out.append(TdxEvent(ev.imr, ev.event_type, ev.digest, ev.event, ACPI_DATA))
        elif ev.imr == 3:
            out.append(_strip_runtime(ev))
    return out


def event_log_to_json(events: Iterable[TdxEvent]) -> str:
    return json.dumps([e.to_json_obj() for e in events], separators=(",", ":"))


def event_log_from_json(text: str | bytes) -> list[TdxEvent]:
    """a JSON event log (a list of upstream `TdxEvent` objects); ParseError if it is not one.

    Bounds: at most `MAX_EVENT_LOG_JSON` (32 MiB) of text and `MAX_EVENTS` events, counted
    before parsing; nesting and item count by `jsonlimits`; each event checked as
    `TdxEvent.from_json_obj` does (imr 0..3, u32 type, digest at most 48 bytes, name through
    `event_name`, hex payload, version 1 or 2). Linear time and memory.
    """
    if len(text) > MAX_EVENT_LOG_JSON:
        raise ParseError("event log json too large")
    # one object per event: refuse a log of too many before building any of them
    braces = text.count(b"{") if isinstance(text, bytes) else text.count("{")
    if braces > MAX_EVENTS:
        raise ParseError("event log has too many events")
    try:
        obj = jsonlimits.loads(text)
    except (ValueError, RecursionError) as e:
        raise ParseError(f"event log is not valid json: {e}") from e
    if not isinstance(obj, list):
        raise ParseError("event log must be a json array")
    if len(obj) > MAX_EVENTS:
        raise ParseError("event log has too many events")
    return [TdxEvent.from_json_obj(o) for o in obj]
