"""versioned attestations: upstream's `VersionedAttestation` wire formats.

* V0 (legacy, SCALE): `0x00 || quote-variant || ... || runtime_events || report_data[64] || config`
  where the TDX variant (0) carries `Vec<u8> quote` and `Vec<TdxEvent>` (imr u32, event_type u32,
  digest bytes, event string, payload bytes; no version or preimage).
* V1 (msgpack, structs as maps): `{"version": 1, "platform": {"kind": "tdx", "data": {quote,
  event_log}}, "stack": {"kind": "dstack", "data": {report_data, runtime_events, config}}}`;
  quote and report_data are arrays of integers, digests and payloads are msgpack bin.

The first byte picks the decoder (0x00 = V0, a msgpack map = V1); at most 10 MiB; trailing
bytes are refused.
"""

from __future__ import annotations

import binascii
import dataclasses
import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from pydstack.errors import show_value
from pydstack.types import msgpacklimits

from .errors import ParseError
from .eventlog import (
    MAX_EVENT_NAME,
    MR_LEN,
    RuntimeEvent,
    TdxEvent,
    event_digest,
    event_name,
    strip_for_certificate,
)
from .quote import Quote, parse_quote
from .scale import Reader, Writer

MAX_ATTESTATION_SIZE = 10 * 1024 * 1024
#: events per log or per runtime list (real boot logs hold a few hundred, rtmr3 a few dozen)
MAX_ITEMS = 4096
#: the longest msgpack array: a quote as an array of byte values
MAX_ARRAY = 64 * 1024
_TWO_U32 = struct.Struct("<II")
#: a TdxEvent from all seven fields, without the named tuple's keyword-handling __new__
_event = functools.partial(tuple.__new__, TdxEvent)
V0_PLATFORMS = {0: "tdx", 1: "gcp-tdx", 2: "nitro-enclave", 3: "sev-snp", 4: "aws-nitro-tpm"}


@dataclass(frozen=True)
class Attestation:
    quote: bytes
    event_log: tuple[TdxEvent, ...]
    runtime_events: tuple[RuntimeEvent, ...]
    report_data: bytes
    config: str
    platform: str = "tdx"

    def with_report_data(self, report_data: bytes) -> Attestation:
        return dataclasses.replace(self, report_data=report_data)


def stripped(att: Attestation) -> Attestation:
    """the form embedded in RA-TLS certificates (ACPI markers and RTMR3 events only)."""
    return dataclasses.replace(att, event_log=tuple(strip_for_certificate(att.event_log)))


# ---------------------------------------------------------------------------------- V0 (SCALE)


def encode_v0(att: Attestation) -> bytes:
    if att.platform != "tdx":
        raise ValueError(f"cannot encode platform {att.platform} as v0")
    if len(att.report_data) != 64:
        raise ValueError("report_data must be 64 bytes")
    w = Writer()
    w.write_u8(0)  # VersionedAttestation::V0
    w.write_u8(0)  # AttestationQuote::DstackTdx
    w.write_bytes(att.quote)
    w.write_compact(len(att.event_log))
    for ev in att.event_log:
        if ev.version != 1:
            raise ValueError("v0 attestations carry only version 1 events")
        w.write_u32(ev.imr)
        w.write_u32(ev.event_type)
        w.write_bytes(ev.digest)
        w.write_str(ev.event)
        w.write_bytes(ev.event_payload)
    w.write_compact(len(att.runtime_events))
    for rt in att.runtime_events:
        if rt.version != 1:
            raise ValueError("v0 attestations carry only version 1 events")
        w.write_str(rt.event)
        w.write_bytes(rt.payload)
    w.write_raw(att.report_data)
    w.write_str(att.config)
    return w.getvalue()


def _count(n: int, what: str) -> int:
    if n > MAX_ITEMS:
        raise ParseError(f"{what} has {n} items, more than {MAX_ITEMS}")
    return n


def _name(raw: bytes) -> str:
    """an event name read as SCALE bytes: utf-8 (strict decoding cannot yield a lone
    surrogate) of at most MAX_EVENT_NAME bytes, as `event_name` takes it."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParseError(f"scale: string is not utf-8: {e}") from e
    if len(raw) > MAX_EVENT_NAME:
        raise ParseError(f"event name longer than {MAX_EVENT_NAME} bytes")
    return name


def _event_v0(r: Reader) -> TdxEvent:
    imr = r.read_u32()
    event_type = r.read_u32()
    digest = r.read_bytes()
    if len(digest) > MR_LEN:
        raise ParseError(f"event digest longer than {MR_LEN} bytes")
    name = _name(r.read_bytes())
    payload = r.read_bytes()
    if imr > 3:
        raise ParseError(f"event imr {imr} out of range")
    return TdxEvent(imr, event_type, digest, name, payload)


def _events_v0(r: Reader, count: int) -> list[TdxEvent]:
    """`count` boot events. An event whose three lengths are one byte each (under 64: every
    field of a real log but a long payload) and that fits is read inline; any other goes
    through `_event_v0`, which also raises for whatever is wrong."""
    data, pos = r.data, r.pos
    size = len(data)
    events = []
    for _ in range(count):
        at = pos + 8
        if at < size and not data[at] & 0b11:
            d_end = at + 1 + (data[at] >> 2)
            if d_end < size and not data[d_end] & 0b11 and d_end - at - 1 <= MR_LEN:
                n_end = d_end + 1 + (data[d_end] >> 2)
                if n_end < size and not data[n_end] & 0b11:
                    p_end = n_end + 1 + (data[n_end] >> 2)
                    imr, event_type = _TWO_U32.unpack_from(data, pos)
                    if p_end <= size and imr <= 3:
                        name = _name(data[d_end + 1 : n_end]) if n_end > d_end + 1 else ""
                        digest, payload = data[at + 1 : d_end], data[n_end + 1 : p_end]
                        events.append(_event((imr, event_type, digest, name, payload, 1, None)))
                        pos = p_end
                        continue
        r.pos = pos
        events.append(_event_v0(r))
        pos = r.pos
    r.pos = pos
    return events


def _decode_v0(data: bytes) -> Attestation:
    r = Reader(data)
    r.read_u8()
    variant = r.read_u8()
    if variant != 0:
        raise ParseError(f"unsupported platform: {V0_PLATFORMS.get(variant, variant)}")
    quote = r.read_bytes()
    events = _events_v0(r, _count(r.read_len(min_item_size=11), "event_log"))
    read_bytes = r.read_bytes
    runtime = [
        RuntimeEvent(_name(read_bytes()), read_bytes())
        for _ in range(_count(r.read_len(2), "runtime_events"))
    ]
    report_data = r.read_fixed(64)
    config = r.read_str()
    r.expect_end()
    return Attestation(quote, tuple(events), tuple(runtime), report_data, config)


# ---------------------------------------------------------------------------------- V1 (msgpack)


def _event_v1(ev: TdxEvent) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "imr": ev.imr,
        "event_type": ev.event_type,
        "digest": ev.digest,
        "event": ev.event,
        "event_payload": ev.event_payload,
    }
    if ev.version == 2:
        obj["version"] = 2
    if ev.preimage is not None:
        obj["preimage"] = ev.preimage
    return obj


def _runtime_v1(ev: RuntimeEvent) -> dict[str, Any]:
    obj: dict[str, Any] = {"event": ev.event, "payload": ev.payload}
    if ev.version == 2:
        obj["version"] = 2
    return obj


def _pack(obj: Any) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


#: where a v4 quote is cut for packing: the header and the TD report up to its report data
#: (fixed while the RTMRs are), the report data, the signature data's length and the signature
#: (new with every quote), and the attestation key and certification data (fixed for a boot).
#: Any cuts give the same bytes; these keep what does not change in whole pieces.
QUOTE_CUTS = (568, 632, 700)


def _array_header(n: int) -> bytes:
    """msgpack's header of an array of `n` elements."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


class _Piece:
    """a piece of a byte string packed as an array of integers: its bytes, the packed elements
    (each byte as a positive fixint below 0x80, else ``0xcc`` and the byte), and the hex of
    both."""

    __slots__ = ("hex", "packed", "packed_hex", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.packed = _pack(list(raw))[len(_array_header(len(raw))) :]
        self.hex = binascii.hexlify(raw)
        self.packed_hex = binascii.hexlify(self.packed)


class ArrayPacker:
    """packs byte strings as msgpack arrays of integers (serde's `Vec<u8>`), cut at `cuts`; each
    piece is kept until the bytes at its place change, so successive quotes of a TD pack and hex
    only their report data and signature again. Safe to share between threads: a piece is only
    used after its bytes were compared with the input's."""

    __slots__ = ("_cuts", "_pieces")

    def __init__(self, cuts: Sequence[int] = ()) -> None:
        self._cuts = tuple(cuts)
        self._pieces: list[_Piece | None] = [None] * (len(self._cuts) + 1)

    def pieces(self, data: bytes) -> list[_Piece]:
        out = []
        start = 0
        for i, end in enumerate((*self._cuts, len(data))):
            end = min(max(end, start), len(data))
            raw = data[start:end]
            piece = self._pieces[i]
            if piece is None or piece.raw != raw:
                piece = self._pieces[i] = _Piece(raw)
            out.append(piece)
            start = end
        return out


class V1Encoding(NamedTuple):
    """a v1 attestation's bytes, their hex, and the hex of the quote it carries."""

    attestation: bytes
    attestation_hex: bytes
    quote_hex: bytes


class V1Encoder:
    """the v1 (msgpack) encoding of attestations that share an event log and a config: the
    parts that do not change are packed (and hexed) once; :meth:`encode` adds a quote and report
    data.

    The bytes are those of packing upstream's document (maps in its key order, byte strings
    as arrays of integers, as serde writes `Vec<u8>`)."""

    __slots__ = ("_fixed", "_fixed_hex", "_quotes", "_report_data")

    def __init__(
        self,
        event_log: Sequence[TdxEvent],
        runtime_events: Sequence[RuntimeEvent],
        config: str,
    ) -> None:
        packer = msgpack.Packer(use_bin_type=True)
        # {"version": 1, "platform": {"kind": "tdx", "data": {"quote": [..], "event_log": [..]}},
        #  "stack": {"kind": "dstack", "data": {"report_data": [..], "runtime_events": [..],
        #  "config": ".."}}}
        head = b"".join(
            (
                packer.pack_map_header(3),
                _pack("version"),
                _pack(1),
                _pack("platform"),
                packer.pack_map_header(2),
                _pack("kind"),
                _pack("tdx"),
                _pack("data"),
                packer.pack_map_header(2),
                _pack("quote"),
            )
        )
        mid = b"".join(
            (
                _pack("event_log"),
                _pack([_event_v1(e) for e in event_log]),
                _pack("stack"),
                packer.pack_map_header(2),
                _pack("kind"),
                _pack("dstack"),
                _pack("data"),
                packer.pack_map_header(3),
                _pack("report_data"),
            )
        )
        tail = b"".join(
            (
                _pack("runtime_events"),
                _pack([_runtime_v1(e) for e in runtime_events]),
                _pack("config"),
                _pack(config),
            )
        )
        self._fixed = (head, mid, tail)
        self._fixed_hex = tuple(binascii.hexlify(part) for part in self._fixed)
        self._quotes = ArrayPacker(QUOTE_CUTS)
        self._report_data = ArrayPacker()

    def _encode(
        self, quote: bytes, report_data: bytes
    ) -> tuple[bytes, list[_Piece], list[_Piece], bytes, bytes]:
        head, mid, tail = self._fixed
        quote_pieces = self._quotes.pieces(quote)
        rd_pieces = self._report_data.pieces(report_data)
        quote_header, rd_header = _array_header(len(quote)), _array_header(len(report_data))
        encoded = b"".join(
            (
                head,
                quote_header,
                *(p.packed for p in quote_pieces),
                mid,
                rd_header,
                *(p.packed for p in rd_pieces),
                tail,
            )
        )
        return encoded, quote_pieces, rd_pieces, quote_header, rd_header

    def encode(self, quote: bytes, report_data: bytes) -> bytes:
        return self._encode(quote, report_data)[0]

    def encode_hex(self, quote: bytes, report_data: bytes) -> V1Encoding:
        """:meth:`encode`'s bytes with their hex and the quote's, for a JSON answer; the hex of
        the unchanged parts is kept."""
        encoded, quote_pieces, rd_pieces, quote_header, rd_header = self._encode(quote, report_data)
        head_hex, mid_hex, tail_hex = self._fixed_hex
        encoded_hex = b"".join(
            (
                head_hex,
                binascii.hexlify(quote_header),
                *(p.packed_hex for p in quote_pieces),
                mid_hex,
                binascii.hexlify(rd_header),
                *(p.packed_hex for p in rd_pieces),
                tail_hex,
            )
        )
        return V1Encoding(encoded, encoded_hex, b"".join(p.hex for p in quote_pieces))


def encode_v1(att: Attestation) -> bytes:
    if att.platform != "tdx":
        raise ValueError(f"cannot encode platform {att.platform}")
    encoder = V1Encoder(att.event_log, att.runtime_events, att.config)
    return encoder.encode(att.quote, att.report_data)


def _map(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ParseError(f"{what} must be a map")
    return obj


def _bytes(obj: Any, what: str, *, size: int | None = None) -> bytes:
    if isinstance(obj, bytes):
        out = obj
    elif isinstance(obj, list):
        try:  # bytes() takes exactly a list of ints in 0..255 (bools count, as msgpack's ints)
            out = bytes(obj)
        except (TypeError, ValueError):
            raise ParseError(f"{what} must be bytes") from None
    else:
        raise ParseError(f"{what} must be bytes")
    if size is not None and len(out) != size:
        raise ParseError(f"{what} must be {size} bytes")
    return out


def _str(obj: Any, what: str) -> str:
    if not isinstance(obj, str):
        raise ParseError(f"{what} must be a string")
    return obj


def _int(obj: Any, what: str, hi: int) -> int:
    if not isinstance(obj, int) or isinstance(obj, bool) or not 0 <= obj <= hi:
        raise ParseError(f"{what} is not a valid integer")
    return obj


def _version(obj: dict[str, Any]) -> int:
    v = obj.get("version", 1)
    if v not in (1, 2) or isinstance(v, bool):
        raise ParseError(f"unsupported event version {show_value(v)}")
    return int(v)


def _list(obj: Any, what: str) -> list[Any]:
    if not isinstance(obj, list) or len(obj) > MAX_ITEMS:
        raise ParseError(f"{what} must be a list of at most {MAX_ITEMS} items")
    return obj


def _decode_v1(data: bytes) -> Attestation:
    try:
        # counts checked against the bytes left before msgpack allocates for them
        doc = msgpacklimits.loads(data, max_depth=16, max_array=MAX_ARRAY, max_map=64)
    except msgpacklimits.MsgpackError as exc:
        raise ParseError(f"attestation is not valid msgpack: {exc}") from exc
    doc = _map(doc, "attestation")
    if doc.get("version") != 1:
        raise ParseError(f"unsupported attestation version {doc.get('version')!r}")
    platform = _map(doc.get("platform"), "platform")
    kind = platform.get("kind")
    if kind != "tdx":
        raise ParseError(f"unsupported platform: {kind}")
    pdata = _map(platform.get("data"), "platform data")
    stack = _map(doc.get("stack"), "stack")
    if stack.get("kind") not in ("dstack", "dstack-pod"):
        raise ParseError(f"unsupported stack: {stack.get('kind')}")
    sdata = _map(stack.get("data"), "stack data")
    events = []
    for item in _list(pdata.get("event_log", []), "event_log"):
        e = _map(item, "event")
        pre = e.get("preimage")
        events.append(
            TdxEvent(
                imr=_int(e.get("imr"), "event imr", 3),
                event_type=_int(e.get("event_type"), "event type", 0xFFFFFFFF),
                digest=event_digest(_bytes(e.get("digest", b""), "event digest")),
                event=event_name(_str(e.get("event", ""), "event name")),
                event_payload=_bytes(e.get("event_payload", b""), "event payload"),
                version=_version(e),
                preimage=None if pre is None else _bytes(pre, "event preimage"),
            )
        )
    runtime = []
    for item in _list(sdata.get("runtime_events", []), "runtime_events"):
        e = _map(item, "runtime event")
        runtime.append(
            RuntimeEvent(
                event_name(_str(e.get("event"), "runtime event name")),
                _bytes(e.get("payload", b""), "runtime event payload"),
                _version(e),
            )
        )
    return Attestation(
        quote=_bytes(pdata.get("quote", b""), "quote"),
        event_log=tuple(events),
        runtime_events=tuple(runtime),
        report_data=_bytes(sdata.get("report_data"), "report_data", size=64),
        config=_str(sdata.get("config", ""), "config"),
    )


# ---------------------------------------------------------------------------------- dispatch


def decode_versioned(data: bytes) -> Attestation:
    """decode a V0 or V1 versioned attestation.

    Contract: ParseError for anything else: empty, over `MAX_ATTESTATION_SIZE` (10 MiB), an
    unknown version byte or platform, malformed SCALE or msgpack, trailing bytes, more than
    `MAX_ITEMS` events per list (V0 counts are checked against the bytes left before any
    event is read; msgpack arrays are capped at `MAX_ARRAY` by the decoder), an event whose
    imr, digest (at most 48 bytes) or name (`event_name`) is invalid, report_data not 64
    bytes. Linear time and memory.
    """
    if not isinstance(data, bytes | bytearray):
        raise ParseError("attestation must be bytes")
    data = bytes(data)
    if not data:
        raise ParseError("attestation is empty")
    if len(data) > MAX_ATTESTATION_SIZE:
        raise ParseError(f"attestation too large ({len(data)} bytes)")
    first = data[0]
    if first == 0x00:
        return _decode_v0(data)
    if 0x80 <= first <= 0x8F or first in (0xDE, 0xDF):
        return _decode_v1(data)
    raise ParseError(f"unknown attestation version byte {first:#04x}")


def to_versioned_bytes(att: Attestation) -> bytes:
    """V0 unless a runtime event needs V1 (version 2 events)."""
    if any(e.version == 2 for e in att.runtime_events) or any(
        e.version == 2 for e in att.event_log
    ):
        return encode_v1(att)
    return encode_v0(att)


def from_quote_and_event_log(
    quote: bytes, event_log: Sequence[TdxEvent], config: str = "", parsed: Quote | None = None
) -> Attestation:
    """a V0-style attestation from a raw quote and its JSON event log (legacy RA-TLS, verifier);
    `parsed`: the caller's parse of `quote`, not parsed again. ParseError for a bad quote."""
    if parsed is None or parsed.raw != quote:
        parsed = parse_quote(quote)
    runtime = tuple(e.to_runtime_event() for e in event_log if e.is_runtime)
    return Attestation(quote, tuple(event_log), runtime, parsed.report_data, config)
