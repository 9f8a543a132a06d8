"""event logs: ccel, runtime events, replay and json forms."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest

from pydstack.attest.errors import ParseError
from pydstack.attest.eventlog import (
    MAX_EVENT_SIZE,
    MAX_EVENTS,
    RUNTIME_EVENT_TYPE,
    RuntimeEvent,
    TdxEvent,
    event_log_from_json,
    event_log_to_json,
    extend_mr,
    parse_ccel,
    replay_rtmrs,
    replay_runtime_events,
    strip_event_log,
)
from pydstack.attest.quote import parse_quote


def test_ccel_replays_to_known_rtmrs(vectors):
    events = parse_ccel((vectors / "dstack/ccel.bin").read_bytes())
    assert len(events) == 18
    assert [e.event for e in events if e.event] == ["acpi-loader", "acpi-rsdp", "acpi-tables"]
    assert sum(1 for e in events if e.imr == 0) == 13
    assert sum(1 for e in events if e.imr == 1) == 5
    rtmr0, rtmr1, rtmr2, rtmr3 = replay_rtmrs(events)
    assert rtmr0.hex().startswith("274c2344")
    assert rtmr1.hex().startswith("bdcf4ee0")
    assert rtmr2 == rtmr3 == bytes(48)


def test_ccel_truncated_or_garbage_is_a_parse_error(vectors):
    data = (vectors / "dstack/ccel.bin").read_bytes()
    with pytest.raises(ParseError):
        parse_ccel(data[:200])
    with pytest.raises(ParseError):
        parse_ccel(b"\x00" * 64)


def _reference_ccel(data: bytes) -> list[tuple[int, int, bytes, bytes]] | None:
    """the TCG crypto-agile log read record by record with nothing skipped; None when it is
    not one parse_ccel accepts (a truncation anywhere, an unknown algorithm, a bad index, ...)."""
    try:
        assert struct.unpack_from("<I", data, 4)[0] == 3  # the spec id header
        size = struct.unpack_from("<I", data, 28)[0]
        header = data[32 : 32 + size]
        assert len(header) == size and header.startswith(b"Spec ID Event03")
        n = struct.unpack_from("<I", header, 24)[0]
        algs = dict(struct.unpack_from("<HH", header, 28 + 4 * i) for i in range(n))
        pos, out = 32 + size, []
        while pos + 4 <= len(data):
            if struct.unpack_from("<I", data, pos)[0] == 0xFFFFFFFF:
                break
            index, kind, count = struct.unpack_from("<III", data, pos)
            pos += 12
            assert count <= n and (count or kind == 3)
            digests = []
            for _ in range(count):
                alg = struct.unpack_from("<H", data, pos)[0]
                length = algs.get(alg, {4: 20, 0xB: 32, 0xC: 48, 0xD: 64, 0x12: 32}.get(alg))
                assert length is not None and pos + 2 + length <= len(data)
                digests.append(data[pos + 2 : pos + 2 + length])
                pos += 2 + length
            length = struct.unpack_from("<I", data, pos)[0]
            payload = data[pos + 4 : pos + 4 + length]
            assert len(payload) == length <= 16 * 1024 * 1024
            pos += 4 + length
            if index:
                assert index <= 4 and len(digests) == 1 and len(digests[0]) <= 48
                out.append((index - 1, kind, digests[0], payload))
        return out
    except (AssertionError, struct.error):
        return None


def _ccel_or_none(data: bytes) -> list[tuple[int, int, bytes, bytes]] | None:
    try:
        return [(e.imr, e.event_type, e.digest, e.event_payload) for e in parse_ccel(data)]
    except ParseError:
        return None


def test_ccel_records_read_at_once_read_as_the_format_says(vectors):
    # a record of one short digest for RTMR0-3 is unpacked at once, any other checked field by
    # field: for every truncation and for each record's fields set to values either side of
    # what the fast read takes, the result is the record-by-record reading's
    data = (vectors / "dstack/ccel.bin").read_bytes()
    used = len(data.rstrip(b"\xff")) + 4
    assert _ccel_or_none(data) == _reference_ccel(data) is not None
    cases = [data[:cut] for cut in range(used)]
    pos = 32 + struct.unpack_from("<I", data, 28)[0]
    while struct.unpack_from("<I", data, pos)[0] != 0xFFFFFFFF:
        count = struct.unpack_from("<I", data, pos + 8)[0]
        digest_end = pos + 12 + count * 50  # sha384 only in this log
        for at, values in [
            (pos, (0, 1, 4, 5)),  # index
            (pos + 8, (0, 1, 2)),  # digest count
            (pos + 12, (0xB, 0xD, 0x99)),  # first algorithm: sha256, sha512, unknown
            (digest_end, (0, 200, 1 << 20, (16 << 20) + 1)),  # event size
        ]:
            fmt = "<H" if at == pos + 12 else "<I"
            for value in values:
                case = bytearray(data[:used])
                struct.pack_into(fmt, case, at, value)
                cases.append(bytes(case))
        pos = digest_end + 4 + struct.unpack_from("<I", data, digest_end)[0]
    for case in cases:
        assert _ccel_or_none(case) == _reference_ccel(case)


def test_ccel_event_count_and_size_are_bounded():
    spec = (
        b"Spec ID Event03\0"
        + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 1)
        + struct.pack("<HH", 0xC, 48)
    )
    header = struct.pack("<II", 1, 3) + bytes(20) + struct.pack("<I", len(spec)) + spec
    event = struct.pack("<IIIH", 2, 1, 1, 0xC) + bytes(48) + struct.pack("<I", 0)
    assert len(parse_ccel(header + event * MAX_EVENTS)) == MAX_EVENTS
    with pytest.raises(ParseError, match="too many events"):
        parse_ccel(header + event * (MAX_EVENTS + 1))
    big = struct.pack("<IIIH", 2, 1, 1, 0xC) + bytes(48) + struct.pack("<I", MAX_EVENT_SIZE)
    assert len(parse_ccel(header + big + bytes(MAX_EVENT_SIZE))[0].event_payload) == MAX_EVENT_SIZE
    big = struct.pack("<IIIH", 2, 1, 1, 0xC) + bytes(48) + struct.pack("<I", MAX_EVENT_SIZE + 1)
    with pytest.raises(ParseError, match="too large"):
        parse_ccel(header + big + bytes(MAX_EVENT_SIZE + 1))


def test_runtime_event_digests():
    v1 = RuntimeEvent("compose-hash", bytes.fromhex("abcd"))
    assert v1.preimage() == b"\x01\x00\x00\x08:compose-hash:\xab\xcd"
    assert v1.digest() == hashlib.sha384(v1.preimage()).digest()
    v2 = RuntimeEvent("compose-hash", bytes.fromhex("abcd"), version=2)
    assert v2.preimage() == b'{"name":"compose-hash","payload":"abcd","type":134217729}'
    esc = RuntimeEvent('a"\n\u00e9', b"", version=2).preimage()
    assert esc == '{"name":"a\\"\\n\u00e9","payload":"","type":134217729}'.encode()
    assert v2.to_tdx_event().preimage == v2.preimage()


def test_runtime_events_replay_to_quote_rtmr3(vectors):
    import json as _json

    doc = _json.loads((vectors / "dstack/verifier_quote-report.json").read_text())
    events = event_log_from_json(doc["event_log"])
    quote = parse_quote(bytes.fromhex(doc["quote"]))
    assert quote.td_report is not None
    assert replay_rtmrs(events) == quote.td_report.rtmrs
    runtime = [e.to_runtime_event() for e in events if e.event_type == RUNTIME_EVENT_TYPE]
    assert replay_runtime_events(runtime) == quote.td_report.rtmr3
    early = replay_runtime_events(runtime, stop_after="boot-mr-done")
    assert early != quote.td_report.rtmr3


def test_json_roundtrip_and_key_order():
    ev = RuntimeEvent("app-id", b"\x01" * 20, version=2).to_tdx_event()
    boot = TdxEvent(0, 10, b"\x02" * 48, "acpi-loader", b"ACPI DATA")
    text = event_log_to_json([boot, ev])
    assert " " not in text
    objs = json.loads(text)
    assert list(objs[0]) == ["imr", "event_type", "digest", "event", "event_payload"]
    assert list(objs[1]) == [
        "imr",
        "event_type",
        "digest",
        "event",
        "event_payload",
        "version",
        "preimage",
    ]
    assert event_log_from_json(text) == [boot, ev]


def test_strip_keeps_what_upstream_keeps():
    boot = TdxEvent(1, 3, b"\x03" * 48, "", b"kernel")
    acpi = TdxEvent(0, 10, b"\x02" * 48, "acpi-rsdp", b"ACPI DATA")
    rt = RuntimeEvent("app-id", b"\x01" * 20).to_tdx_event()
    stripped = strip_event_log([boot, acpi, rt])
    assert stripped[0].event_payload == b"" and stripped[0].digest == boot.digest
    assert stripped[1].event_payload == b"ACPI DATA"
    assert stripped[2].digest == b"" and stripped[2].event_payload == rt.event_payload
    # replay still works: runtime digests are recomputed from their payloads
    assert replay_rtmrs(stripped)[3] == extend_mr(bytes(48), rt.digest)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "{}",
        "[1]",
        '[{"imr":5,"event_type":1,"event_payload":""}]',
        '[{"imr":0}]',
        '[{"imr":0,"event_type":1,"event_payload":"zz"}]',
    ],
)
def test_bad_event_log_json(bad):
    with pytest.raises(ParseError):
        event_log_from_json(bad)


_OK = {"imr": 3, "event_type": 1, "digest": "", "event": "e", "event_payload": ""}


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("imr", True, "invalid imr"),
        ("imr", 4, "invalid imr"),
        ("imr", -1, "invalid imr"),
        ("imr", "1", "invalid imr"),
        ("imr", 1.0, "invalid imr"),
        ("event_type", False, "invalid event_type"),
        ("event_type", -1, "invalid event_type"),
        ("event_type", 1 << 32, "invalid event_type"),
        ("event_type", None, "invalid event_type"),
        ("version", True, "unsupported version"),
        ("version", 3, "unsupported version"),
        ("event", 7, "must be a string"),
        ("event", "\udcff", "lone surrogate"),
        ("event", "a" * 4097, "longer than 4096 bytes"),
        ("event", "\u00e9" * 2049, "longer than 4096 bytes"),  # 2049 characters, 4098 bytes
        ("digest", "00" * 49, "longer than 48"),
    ],
)
def test_json_event_fields_are_checked_one_by_one(field, value, reason):
    assert TdxEvent.from_json_obj(_OK) == TdxEvent(3, 1, b"", "e", b"")
    assert TdxEvent.from_json_obj({**_OK, "event": "a" * 4096}).event == "a" * 4096
    assert TdxEvent.from_json_obj({**_OK, "event": "\u00e9" * 2048}).event == "\u00e9" * 2048
    with pytest.raises(ParseError, match=reason):
        TdxEvent.from_json_obj({**_OK, field: value})


def test_runtime_log_line_roundtrip():
    ev = RuntimeEvent("key-provider", b'{"name":"kms"}', version=2)
    line = ev.to_log_line()
    assert json.loads(line) == {
        "event": "key-provider",
        "payload": "eyJuYW1lIjoia21zIn0=",
        "version": 2,
    }
    assert RuntimeEvent.from_log_line(line) == ev
    with pytest.raises(ParseError):
        RuntimeEvent.from_log_line('{"event":"x","payload":"!!"}')
