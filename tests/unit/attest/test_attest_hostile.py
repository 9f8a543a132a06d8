"""event-log and attestation decoders validate at parse time and bound item counts before
building objects (findings of a fuzzing run: they failed later, or allocated without bound)."""

from __future__ import annotations

import json
import struct

import msgpack
import pytest

from pydstack.attest.attestation import (
    MAX_ITEMS,
    Attestation,
    decode_versioned,
    encode_v0,
    encode_v1,
)
from pydstack.attest.errors import ParseError
from pydstack.attest.eventlog import (
    MAX_EVENTS,
    RuntimeEvent,
    TdxEvent,
    event_log_from_json,
    parse_ccel,
)
from pydstack.attest.scale import Writer

EVENT = {"imr": 3, "event_type": 1, "digest": "00" * 48, "event": "e", "event_payload": ""}


def test_runtime_event_line_with_non_ascii_payload_is_a_parse_error():
    with pytest.raises(ParseError, match="base64"):
        RuntimeEvent.from_log_line('{"event": "x", "payload": "\u00e9\u00e9=="}')


def test_lone_surrogate_event_names_are_refused_when_parsed():
    with pytest.raises(ParseError, match="lone surrogate"):
        event_log_from_json(json.dumps([{**EVENT, "event": "\udfff"}]))
    with pytest.raises(ParseError, match="lone surrogate"):
        RuntimeEvent.from_log_line('{"event": "\\udfff", "payload": ""}')


def test_digests_longer_than_48_bytes_are_refused_when_parsed():
    with pytest.raises(ParseError, match="longer than 48"):
        event_log_from_json(json.dumps([{**EVENT, "digest": "00" * 49}]))
    long = TdxEvent(0, 1, bytes(49), "e", b"")
    att = Attestation(b"q", (long,), (), bytes(64), "")
    for encode in (encode_v0, encode_v1):
        with pytest.raises(ParseError, match="longer than 48"):
            decode_versioned(encode(att))


def test_v0_runtime_event_count_is_bounded_before_decoding():
    w = Writer()
    w.write_u8(0)
    w.write_u8(0)
    w.write_bytes(b"quote")
    w.write_compact(0)
    n = MAX_ITEMS + 1
    w.write_compact(n)
    for _ in range(n):
        w.write_str("")
        w.write_bytes(b"")
    w.write_raw(bytes(64))
    w.write_str("")
    with pytest.raises(ParseError, match="more than"):
        decode_versioned(w.getvalue())


def test_v1_arrays_are_bounded_by_the_decoder():
    doc = {"version": 1, "platform": {"kind": "tdx", "data": {"quote": [0] * 100_000}}}
    with pytest.raises(ParseError, match="msgpack"):
        decode_versioned(msgpack.packb(doc))


def test_json_event_log_with_too_many_events_is_refused_before_parsing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the count is checked on the text: the json parser is never reached, so no event
    # object is built (a process-wide allocation peak is not a reliable witness here:
    # other threads of the test session allocate too)
    import pydstack.attest.eventlog as eventlog

    def parse_called(_text: object) -> object:
        raise AssertionError("the json parser ran on an over-long event log")

    monkeypatch.setattr(eventlog.jsonlimits, "loads", parse_called)
    text = "[" + ",".join(["{}"] * (MAX_EVENTS + 1)) + "]"
    with pytest.raises(ParseError, match="too many events"):
        event_log_from_json(text)
    ok = "[" + ",".join(["{}"] * MAX_EVENTS) + "]"
    with pytest.raises(AssertionError, match="json parser ran"):
        event_log_from_json(ok)  # at the limit, parsing goes ahead


def _ccel(alg: int, size: int) -> bytes:
    """a CCEL whose spec-ID header lists one algorithm, then one RTMR0 event digested by it."""
    spec = b"Spec ID Event03\0" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 1)
    spec += struct.pack("<HH", alg, size) + b"\0"
    header = struct.pack("<II", 1, 3) + bytes(20) + struct.pack("<I", len(spec)) + spec
    event = struct.pack("<IIIH", 1, 1, 1, alg) + b"\x11" * size + struct.pack("<I", 2) + b"ev"
    return header + event + b"\xff" * 8


def test_ccel_digests_longer_than_48_bytes_are_refused_when_parsed():
    # a fuzzing finding: a sha512 digest parsed, then replay raised ValueError
    assert parse_ccel(_ccel(0xC, 48))[0].digest == b"\x11" * 48
    with pytest.raises(ParseError, match="longer than 48"):
        parse_ccel(_ccel(0xD, 64))


@pytest.mark.parametrize("field", ["imr", "version"])
@pytest.mark.parametrize("value", ["3" * 100_000, [0] * 50_000, {"a": "b" * 100_000}, 10**500])
def test_event_log_errors_do_not_repeat_what_the_peer_sent(field: str, value: object) -> None:
    entry = {"imr": 3, "event_type": 1, "digest": "00" * 48, "event": "", "event_payload": ""}
    entry[field] = value
    with pytest.raises(ParseError) as e:
        event_log_from_json(json.dumps([entry]))
    assert len(str(e.value)) < 120, str(e.value)[:200]
