"""versioned attestations and app identity on upstream's fixtures."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pydstack.attest.attestation import (
    decode_versioned,
    encode_v0,
    encode_v1,
    stripped,
    to_versioned_bytes,
)
from pydstack.attest.errors import ParseError
from pydstack.attest.eventlog import RuntimeEvent, replay_rtmrs, replay_runtime_events
from pydstack.attest.identity import AppInfo, compose_hash, mr_config_id_v1
from pydstack.attest.quote import parse_quote
from pydstack.attest.report_data import ratls_report_data, to_report_data


@pytest.fixture(scope="module")
def sim_bin(vectors) -> bytes:
    return (vectors / "dstack/simulator_attestation.bin").read_bytes()


def test_v0_decodes_and_reencodes_exactly(sim_bin):
    att = decode_versioned(sim_bin)
    assert len(att.quote) == 5010
    assert len(att.event_log) == 33 and len(att.runtime_events) == 9
    assert [e.event for e in att.runtime_events] == [
        "system-preparing",
        "app-id",
        "compose-hash",
        "instance-id",
        "boot-mr-done",
        "os-image-hash",
        "key-provider",
        "storage-fs",
        "system-ready",
    ]
    assert att.report_data == bytes(64)
    assert encode_v0(att) == sim_bin
    assert to_versioned_bytes(att) == sim_bin


def test_event_log_replays_to_the_quote(sim_bin):
    att = decode_versioned(sim_bin)
    report = parse_quote(att.quote).td_report
    assert report is not None
    assert replay_rtmrs(att.event_log) == report.rtmrs
    assert replay_runtime_events(att.runtime_events) == report.rtmr3


def test_app_identity_matches_upstream(sim_bin):
    att = decode_versioned(sim_bin)
    info = AppInfo.from_attestation(att, boottime_mr=False)
    assert info.app_id.hex() == "5bb4ff9a3837357f19dc176407a5709c62eb6c56"
    assert info.instance_id.hex() == "1691ed1b47506cad7d08834668691d88246f5b1f"
    assert info.compose_hash.hex() == (
        "c143116fef3940e7f776bfc0919c256232ae5338a6e948c96b711e0b2383483a"
    )
    assert info.mr_system.hex() == (
        "51ea38f8eee6dc72dbae9b74531ae6d6204295d265dabb4e6c34621a2a1a1197"
    )
    assert info.mr_aggregated.hex() == (
        "85334a62c97d0f8bf82d0245d31b539d17a2d7c258e2a13efc928aaea0e107cb"
    )
    assert info.os_image_hash.hex().startswith("e61be43d")
    assert info.device_id.hex() == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    early = AppInfo.from_attestation(att, boottime_mr=True)
    assert early.mr_aggregated.hex().startswith("787f9fe5")
    assert early.key_provider_info == b""
    report = parse_quote(att.quote).td_report
    assert report is not None and report.mr_config_id == mr_config_id_v1(info.compose_hash)
    assert AppInfo.from_msgpack(info.to_msgpack()) == info


def test_v1_roundtrip_and_selection(sim_bin):
    att = decode_versioned(sim_bin)
    v1 = encode_v1(att)
    assert 0x80 <= v1[0] <= 0x8F
    assert decode_versioned(v1) == att
    v2 = dataclasses.replace(
        att, runtime_events=(*att.runtime_events, RuntimeEvent("x", b"1", version=2))
    )
    assert to_versioned_bytes(v2)[0] != 0
    assert decode_versioned(to_versioned_bytes(v2)) == v2


def test_stripped_keeps_acpi_and_rtmr3(sim_bin):
    s = stripped(decode_versioned(sim_bin))
    assert all(e.imr in (0, 3) for e in s.event_log)
    assert sum(1 for e in s.event_log if e.imr == 0) == 3
    assert all(e.digest == b"" for e in s.event_log if e.imr == 3)


def test_lite_fixture_decodes(vectors):
    doc = json.loads((vectors / "dstack/verifier_tdx-lite-attestation.json").read_text())
    att = decode_versioned(bytes.fromhex(doc["attestation"]))
    assert len(att.event_log) == 12 and len(att.runtime_events) == 9
    report = parse_quote(att.quote).td_report
    assert report is not None
    assert replay_runtime_events(att.runtime_events) == report.rtmr3


def test_trailing_bytes_and_unknown_versions_refused(sim_bin):
    for bad in (sim_bin + b"\x00", b"\x01abc", b"", sim_bin[:100], b"\x81\xa7version\x02"):
        with pytest.raises(ParseError):
            decode_versioned(bad)


def test_report_data_conventions():
    assert to_report_data("app-data", b"test content").hex() == (
        "7ea0b744ed5e9c0c83ff9f575668e1697652cd349f2027cdf26f918d4c53e8cd"
        "50b5ea9b449b4c3d50e20ae00ec29688d5a214e8daff8a10041f5d624dae8a01"
    )
    assert to_report_data("x", b"y", "sha256")[32:] == bytes(32)
    assert len(to_report_data("x", b"y", "keccak256")) == 64
    with pytest.raises(ValueError, match="invalid content length"):
        to_report_data("", b"short", "raw")
    with pytest.raises(ValueError, match="invalid hash algorithm"):
        to_report_data("", b"", "md5")
    assert len(ratls_report_data(b"spki")) == 64


def test_compose_hash_is_raw_sha256(vectors):
    raw = (vectors / "dstack/simulator_app-compose.json").read_bytes()
    assert compose_hash(raw).hex().startswith("65b4e574")


def test_v1_bytes_are_upstreams_document_packed(sim_bin):
    """the spliced encoder writes exactly what packing upstream's v1 document writes."""
    import msgpack

    att = decode_versioned(sim_bin)
    att = dataclasses.replace(
        att,
        runtime_events=(*att.runtime_events, RuntimeEvent("x", b"\x80\xff", version=2)),
        report_data=bytes(range(200, 256)) + bytes(8),
    )
    doc = {
        "version": 1,
        "platform": {
            "kind": "tdx",
            "data": {
                "quote": list(att.quote),
                "event_log": [
                    {
                        "imr": e.imr,
                        "event_type": e.event_type,
                        "digest": e.digest,
                        "event": e.event,
                        "event_payload": e.event_payload,
                        **({"version": 2} if e.version == 2 else {}),
                        **({"preimage": e.preimage} if e.preimage is not None else {}),
                    }
                    for e in att.event_log
                ],
            },
        },
        "stack": {
            "kind": "dstack",
            "data": {
                "report_data": list(att.report_data),
                "runtime_events": [
                    {
                        "event": e.event,
                        "payload": e.payload,
                        **({"version": 2} if e.version == 2 else {}),
                    }
                    for e in att.runtime_events
                ],
                "config": att.config,
            },
        },
    }
    assert encode_v1(att) == msgpack.packb(doc, use_bin_type=True)


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 567, 600, 632, 700, 701, 4509, 65535, 70_000])
def test_byte_arrays_pack_as_msgpack_packs_their_integers(size):
    """the packer cut at a quote's places (with its kept pieces) writes what packing the list of
    integers writes, and the hex of the data, also after a byte changes in any piece."""
    import binascii
    import os

    import msgpack

    from pydstack.attest.attestation import QUOTE_CUTS, ArrayPacker, _array_header

    def packed(packer: ArrayPacker, data: bytes) -> tuple[bytes, bytes, bytes]:
        """the whole array, the hex of its elements and the hex of the data, from the pieces."""
        pieces = packer.pieces(data)
        return (
            _array_header(len(data)) + b"".join(p.packed for p in pieces),
            b"".join(p.packed_hex for p in pieces),
            b"".join(p.hex for p in pieces),
        )

    packer = ArrayPacker(QUOTE_CUTS)
    data = bytearray(os.urandom(size))
    for where in (None, 0, 570, 640, size - 1, size // 2):
        if where is not None and size:
            data[min(where, size - 1)] ^= 0xFF  # that piece changes, the others are kept
        expected = msgpack.packb(list(data))
        whole, elements_hex, data_hex = packed(packer, bytes(data))
        assert whole == expected
        assert elements_hex == binascii.hexlify(expected[len(_array_header(size)) :])
        assert data_hex == binascii.hexlify(data)
    every = bytes(range(256)) * 3
    assert packed(ArrayPacker(QUOTE_CUTS), every)[0] == msgpack.packb(list(every))


def test_v1_encoder_hex_is_the_hex_of_its_bytes(sim_bin):
    """encode_hex's bytes equal encode's and packing upstream's document, and its hex equals
    theirs, for successive quotes that differ in report data and signature."""
    import binascii
    import os

    from pydstack.attest.attestation import V1Encoder

    att = decode_versioned(sim_bin)
    encoder = V1Encoder(att.event_log, att.runtime_events, att.config)
    quote = bytearray(att.quote)
    for _ in range(3):
        rd = os.urandom(64)
        quote[568:632] = rd
        quote[636:700] = os.urandom(64)
        doc = dataclasses.replace(att, quote=bytes(quote), report_data=rd)
        enc = encoder.encode_hex(bytes(quote), rd)
        assert enc.attestation == encoder.encode(bytes(quote), rd) == encode_v1(doc)
        assert enc.attestation_hex == binascii.hexlify(enc.attestation)
        assert enc.quote_hex == binascii.hexlify(quote)


def _reference_v0(data: bytes) -> tuple[object, ...]:
    """V0 read field by field with the plain SCALE reader (the wire format's definition)."""
    from pydstack.attest.scale import Reader

    def name(raw: bytes) -> str:
        text = raw.decode("utf-8")
        if len(raw) > 4096:
            raise ParseError("event name longer than 4096 bytes")
        return text

    r = Reader(data)
    assert r.read_u8() == 0 and r.read_u8() == 0
    quote = r.take(r.read_len())
    events = []
    for _ in range(r.read_len(11)):
        imr, event_type, digest = r.read_u32(), r.read_u32(), r.take(r.read_len())
        if len(digest) > 48:
            raise ParseError("digest")
        events.append((imr, event_type, digest, name(r.take(r.read_len())), r.take(r.read_len())))
        if imr > 3:
            raise ParseError("imr")
    runtime = [(name(r.take(r.read_len())), r.take(r.read_len())) for _ in range(r.read_len(2))]
    report_data, config = r.take(64), r.take(r.read_len()).decode()
    r.expect_end()
    return quote, events, runtime, report_data, config


def _v0_or_error(data: bytes) -> tuple[object, ...] | None:
    try:
        att = decode_versioned(data)
    except ParseError:
        return None
    events = [(e.imr, e.event_type, e.digest, e.event, e.event_payload) for e in att.event_log]
    runtime = [(e.event, e.payload) for e in att.runtime_events]
    return att.quote, events, runtime, att.report_data, att.config


def _reference_or_error(data: bytes) -> tuple[object, ...] | None:
    try:
        return _reference_v0(data)
    except (ParseError, UnicodeDecodeError):
        return None


@pytest.mark.parametrize("size", [0, 1, 47, 48, 49, 63, 64, 65, 300, 20_000])
def test_v0_events_of_every_field_size_decode_as_read_field_by_field(sim_bin, size):
    # boot events whose fields fit a one-byte length are read inline, others field by field:
    # both must give what the wire format says, at the one-byte boundary (63/64) and beyond,
    # for a digest past 48 bytes, an imr past 3, a truncation anywhere
    from pydstack.attest.eventlog import TdxEvent

    att = decode_versioned(sim_bin)
    odd = (
        TdxEvent(1, 7, b"\x01" * min(size, 48), "n" * min(size, 4096), b"p" * size),
        TdxEvent(2, 8, b"\x02" * 48, "é" * min(size // 2, 2048), b""),
        TdxEvent(3, 9, b"", "", b"q" * size),
    )
    data = encode_v0(dataclasses.replace(att, event_log=att.event_log[:3] + odd))
    assert _v0_or_error(data) == _reference_or_error(data) is not None
    long_digest = TdxEvent(1, 7, b"\x01" * 49, "n", b"")
    refused = encode_v0(dataclasses.replace(att, event_log=(*att.event_log[:3], long_digest)))
    assert _v0_or_error(refused) is _reference_or_error(refused) is None
    at = len(att.quote) + 3  # the event count's byte
    mutated = [data[:cut] for cut in range(at, min(len(data), at + 900), 5)]
    for i in range(at, min(len(data), at + 900), 3):
        for value in (0x00, 0x04, 0xC1, 0xC4, 0xFC, 0x10, 0xFF):
            mutated.append(data[:i] + bytes([value]) + data[i + 1 :])
    for case in mutated:
        assert _v0_or_error(case) == _reference_or_error(case)


def test_identity_events_count_before_system_ready_and_only_the_first(sim_bin):
    att = decode_versioned(sim_bin)
    report = parse_quote(att.quote).td_report
    events = (
        RuntimeEvent("app-id", b"\x01" * 20),
        RuntimeEvent("init-script-hash", b"\x0a" * 32),
        RuntimeEvent("app-id", b"\x02" * 20),
        RuntimeEvent("key-provider", b"kp"),
        RuntimeEvent("init-script-hash", b"\x0b" * 32),
        RuntimeEvent("system-ready", b""),
        RuntimeEvent("compose-hash", b"\x03" * 32),
        RuntimeEvent("init-script-hash", b"\x0c" * 32),
    )
    info = AppInfo.from_attestation(
        dataclasses.replace(att, runtime_events=events), boottime_mr=False, report=report
    )
    assert info.app_id == b"\x01" * 20 and info.compose_hash == b"" and info.instance_id == b""
    assert info.key_provider_info == b"kp"
    assert info.init_script_hashes == (b"\x0a" * 32, b"\x0b" * 32)
    none = AppInfo.from_attestation(
        dataclasses.replace(att, runtime_events=events[5:]), boottime_mr=False, report=report
    )
    assert (none.app_id, none.key_provider_info, none.init_script_hashes) == (b"", b"", None)
