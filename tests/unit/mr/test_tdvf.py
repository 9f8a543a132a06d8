"""TDVF metadata, MRTD, the TD HOB and its witness, RTMR0: against independent computations,
upstream's witness vector and the real boot log in ccel.bin."""

from __future__ import annotations

import struct

import pytest

from pydstack.attest.errors import ParseError
from pydstack.attest.eventlog import parse_ccel
from pydstack.mr import tdvf
from pydstack.mr.tdvf import AcpiDigests, Tdvf, build_td_hob, rtmr0_log, td_hob_digest_from_witness

from .synth import FW_SIZE, LAYOUT, Sec, expected_mrtd, firmware

GIB = 1 << 30


def test_parse_finds_the_sections():
    t = Tdvf.parse(firmware())
    assert [(s.type, s.memory_address, s.memory_data_size) for s in t.sections] == [
        (s.type, s.address, s.size) for s in LAYOUT
    ]


@pytest.mark.parametrize("two_pass", [False, True])
def test_mrtd_matches_the_tdx_module_definition(two_pass):
    fw = firmware()
    assert Tdvf.parse(fw).mrtd(two_pass=two_pass) == expected_mrtd(fw, LAYOUT, two_pass=two_pass)


def test_page_add_order_and_content_change_mrtd():
    fw = firmware()
    t = Tdvf.parse(fw)
    assert t.mrtd(two_pass=True) != t.mrtd(two_pass=False)
    # a byte inside the extended BFV changes MRTD; one outside every extended range does not
    bfv = LAYOUT[0]
    inside = bytearray(fw)
    inside[bfv.data_offset + 0x123] ^= 1
    outside = bytearray(fw)
    outside[0x10000] ^= 1
    assert Tdvf.parse(bytes(inside)).mrtd(two_pass=False) != t.mrtd(two_pass=False)
    assert Tdvf.parse(bytes(outside)).mrtd(two_pass=False) == t.mrtd(two_pass=False)


def test_witness_is_upstreams_for_dstacks_layout():
    # upstream dstack-mr's own vector for these four ranges
    assert Tdvf.parse(firmware()).witness().hex() == "80100904000609020b021010"


@pytest.mark.parametrize("memory", [GIB, 2 * GIB, 0xB0000000, 3 * GIB, 64 * GIB])
def test_witness_rebuilds_the_td_hob_of_the_firmware(memory):
    t = Tdvf.parse(firmware())
    assert td_hob_digest_from_witness(t.witness(), memory) == t.td_hob_digest(memory)


def _resources(hob: bytes) -> list[tuple[int, int, int]]:
    out = []
    for at in range(56, len(hob), 48):
        htype, length, _, _, kind, attr, start, size = struct.unpack_from("<HHI16sIIQQ", hob, at)
        assert (htype, length, attr) == (3, 48, 7)
        out.append((kind, start, size))
    return out


def test_td_hob_describes_accepted_and_unaccepted_memory():
    accepted = [(0x800000, 0x806000), (0x809000, 0x80B000), (0x80B000, 0x80D000)]
    hob = build_td_hob(accepted, 0x809000, 2 * GIB)
    assert struct.unpack_from("<HHIII", hob) == (1, 56, 0, 9, 0)
    assert struct.unpack_from("<Q", hob, 48)[0] == 0x809000 + len(hob) + 8
    assert _resources(hob) == [
        (7, 0, 0x800000),
        (0, 0x800000, 0x6000),
        (7, 0x806000, 0x3000),
        (0, 0x809000, 0x2000),
        (0, 0x80B000, 0x2000),
        (7, 0x80D000, 2 * GIB - 0x80D000),
    ]
    # from 0xB0000000 bytes on, RAM above 2 GiB is mapped from 4 GiB
    high = _resources(build_td_hob(accepted, 0x809000, 3 * GIB))
    assert high[-2:] == [(7, 0x80D000, 2 * GIB - 0x80D000), (7, 4 * GIB, GIB)]


def test_rtmr0_fixed_events_are_those_of_a_real_boot(vectors):
    events = [e for e in parse_ccel((vectors / "dstack/ccel.bin").read_bytes()) if e.imr == 0]
    acpi = AcpiDigests(*[e.digest for e in events if e.event.startswith("acpi-")])
    assert rtmr0_log(events[0].digest, acpi) == [e.digest for e in events]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (
            lambda fw: fw.__setitem__(slice(FW_SIZE - 48, FW_SIZE - 32), bytes(16)),
            "no guided table",
        ),
        (lambda fw: fw.__setitem__(slice(0x1000, 0x1004), b"XXXX"), "signature"),
        (lambda fw: struct.pack_into("<I", fw, 0x1008, 2), "version 2"),
        (lambda fw: struct.pack_into("<I", fw, 0x100C, 1000), "sections"),
        (lambda fw: struct.pack_into("<I", fw, FW_SIZE - 72, 8), "past the end"),
        (lambda fw: struct.pack_into("<I", fw, FW_SIZE - 72, FW_SIZE + 1), "outside"),
        (lambda fw: struct.pack_into("<H", fw, FW_SIZE - 50, 5), "table length 5"),
        (lambda fw: struct.pack_into("<H", fw, FW_SIZE - 68, 0x7000), "entry length"),
        (lambda fw: struct.pack_into("<Q", fw, 0x1010 + 8, 0xFFFC0001), "aligned"),
        (lambda fw: struct.pack_into("<I", fw, 0x1010 + 4, 0x9000), "smaller than its raw"),
        (lambda fw: struct.pack_into("<Q", fw, 0x1010 + 64 + 16, 1 << 40), "pages"),
        (lambda fw: struct.pack_into("<I", fw, 0x1010, FW_SIZE - 0x1000), "beyond the end"),
    ],
)
def test_malformed_metadata_is_refused(mutate, reason):
    fw = bytearray(firmware())
    mutate(fw)
    with pytest.raises(ParseError, match=reason):
        Tdvf.parse(bytes(fw))


def test_firmware_without_tdvf_is_refused():
    plain = bytes(range(256)) * 4096  # like Debian's OVMF: no TDX metadata in its table
    with pytest.raises(ParseError, match="no tdvf metadata"):
        Tdvf.parse(plain)
    with pytest.raises(ParseError, match="too small"):
        Tdvf.parse(b"\0" * 40)


def test_huge_sections_are_refused_before_any_work():
    big = (Sec(3, 0, 0x800000, 1 << 40),)
    with pytest.raises(ParseError, match="pages"):
        Tdvf.parse(firmware(big))


@pytest.mark.parametrize(
    ("witness", "reason"),
    [
        ("8010", "truncated"),
        ("80100904000609020b02101000", "trailing"),
        ("801009ff7f", "too short"),
        ("ffffffffffffffffffff01", "too large"),
        ("ffffffffffff0f0001" + "00" + "01", "beyond"),
    ],
)
def test_malformed_witness_is_refused(witness, reason):
    with pytest.raises(ParseError, match=reason):
        td_hob_digest_from_witness(bytes.fromhex(witness), 2 * GIB)


def test_td_hob_bounds_memory():
    with pytest.raises(ParseError, match="memory size"):
        build_td_hob([], 0x809000, 0)
    with pytest.raises(ParseError, match="memory size"):
        build_td_hob([], 0x809000, tdvf.MAX_ADDRESS)


def test_witness_needs_one_td_hob_section():
    no_hob = tuple(s for s in LAYOUT if s.type != 2)
    with pytest.raises(ParseError, match="0 TD_HOB"):
        Tdvf.parse(firmware(no_hob)).witness()
    overlap = (*LAYOUT, Sec(3, 0, 0x80A000, 0x1000))
    with pytest.raises(ParseError, match="overlap"):
        Tdvf.parse(firmware(overlap)).witness()
