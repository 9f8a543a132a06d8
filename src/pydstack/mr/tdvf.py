"""TDVF firmware metadata: MRTD, the TD HOB and the RTMR0 event log of a TDX guest.

The firmware ends with OVMF's GUIDed table (before the last 32 bytes: `u16 total length`, footer
GUID 96b582de-...; entries before it, each `data, u16 entry length, GUID`, walked backwards).
The entry with GUID e47a6535-... holds, in its last 4 bytes, the distance from the end of the
firmware to the TDVF descriptor: `"TDVF", u32 length, u32 version (1), u32 section count`, then
32-byte sections `u32 data_offset, u32 raw_data_size, u64 memory_address, u64 memory_data_size,
u32 type, u32 attributes`.

MRTD is what the TDX module accumulates while the VMM builds the TD: for every 4 KiB page of
every section a 128-byte `MEM.PAGE.ADD` record (GPA at bytes 16..24; not for PAGE_AUG sections),
and for MR_EXTEND sections, per 256-byte chunk, a 128-byte `MR.EXTEND` record followed by the
chunk. QEMU 8 adds all pages of a section before extending them (two-pass); QEMU 9 interleaves
per page (single-pass).

The TD HOB (RTMR0's first event) describes memory: a PHIT HOB and one resource HOB per range,
the ranges the firmware accepts itself (TD_HOB and TEMP_MEM sections) as system memory and the
rest of guest RAM as unaccepted; with 0xB0000000 bytes of RAM or more QEMU splits RAM at 2 GiB
and maps the rest from 4 GiB. The witness is the compact form of what the TD HOB needs from the
firmware (LEB128: base page, TD HOB page delta, range count, then start delta and page count per
range), so the HOB can be rebuilt for any memory size without the firmware.

Every parser here raises :class:`ParseError` for malformed input and bounds the work it does
(sections, pages, firmware size) before doing it.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from pydstack.attest.errors import ParseError

PAGE = 0x1000
MR_EXTEND_CHUNK = 0x100
ATTR_MR_EXTEND = 0x1
ATTR_PAGE_AUG = 0x2
SECTION_BFV, SECTION_CFV, SECTION_TD_HOB, SECTION_TEMP_MEM = 0, 1, 2, 3
TABLE_FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
TDX_METADATA_GUID = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2")
BYTES_AFTER_TABLE = 32
#: the largest firmware read (OVMF is 2-4 MiB)
MAX_FIRMWARE = 64 * 1024 * 1024
MAX_SECTIONS = 64
#: pages all sections may cover together (1 GiB); real TDVF covers a few MiB
MAX_PAGES = 0x40000
#: addresses at or beyond this (4 PiB) are refused
MAX_ADDRESS = 1 << 52
#: QEMU's high-memory layout threshold and its 2 GiB split
HIGH_MEMORY = 0xB0000000
LOW_SPLIT = 0x80000000
DEFAULT_TD_HOB_BASE = 0x809000

_SECTION = struct.Struct("<IIQQII")
_DESCRIPTOR = struct.Struct("<4sIII")


def sha384(data: bytes) -> bytes:
    return hashlib.sha384(data).digest()


def measure_log(digests: Sequence[bytes]) -> bytes:
    """a register from 48 zero bytes extended with each digest: sha384(mr || digest)."""
    mr = bytes(48)
    for d in digests:
        mr = hashlib.sha384(mr + d).digest()
    return mr


@dataclass(frozen=True)
class TdvfSection:
    data_offset: int
    raw_data_size: int
    memory_address: int
    memory_data_size: int
    type: int
    attributes: int

    @property
    def pages(self) -> int:
        return self.memory_data_size // PAGE


@dataclass(frozen=True)
class Tdvf:
    """a firmware image and its TDVF sections."""

    firmware: bytes
    sections: tuple[TdvfSection, ...]

    @classmethod
    def parse(cls, firmware: bytes) -> Tdvf:
        """the TDVF metadata of `firmware`; ParseError when it has none or it is malformed."""
        return cls(bytes(firmware), parse_sections(firmware))

    def mrtd(self, *, two_pass: bool) -> bytes:
        """MRTD with QEMU's two-pass (QEMU 8) or single-pass (QEMU 9+) page-add order."""
        h = hashlib.sha384()
        fw = self.firmware
        for s in self.sections:
            add = not s.attributes & ATTR_PAGE_AUG
            extend = bool(s.attributes & ATTR_MR_EXTEND)

            def page_add(page: int, s: TdvfSection = s) -> bytes:
                return _record(b"MEM.PAGE.ADD", s.memory_address + page * PAGE)

            def page_extend(page: int, s: TdvfSection = s) -> bytes:
                base = s.memory_address + page * PAGE
                src = s.data_offset + page * PAGE
                return b"".join(
                    _record(b"MR.EXTEND", base + off) + fw[src + off : src + off + MR_EXTEND_CHUNK]
                    for off in range(0, PAGE, MR_EXTEND_CHUNK)
                )

            if two_pass:
                if add:
                    for page in range(s.pages):
                        h.update(page_add(page))
                if extend:
                    for page in range(s.pages):
                        h.update(page_extend(page))
            else:
                for page in range(s.pages):
                    if add:
                        h.update(page_add(page))
                    if extend:
                        h.update(page_extend(page))
        return h.digest()

    def accepted_ranges(self) -> list[tuple[int, int]]:
        """(start page, page count) of the TD_HOB and TEMP_MEM sections, sorted by start."""
        ranges = [
            (s.memory_address // PAGE, s.pages)
            for s in self.sections
            if s.type in (SECTION_TD_HOB, SECTION_TEMP_MEM)
        ]
        return sorted(ranges)

    def td_hob_base(self) -> int:
        hob = [s.memory_address for s in self.sections if s.type == SECTION_TD_HOB]
        return hob[-1] if hob else DEFAULT_TD_HOB_BASE

    def td_hob_digest(self, memory_size: int) -> bytes:
        """sha384 of the TD HOB for `memory_size` bytes of guest RAM."""
        ranges = [
            (s.memory_address, s.memory_address + s.memory_data_size)
            for s in self.sections
            if s.type in (SECTION_TD_HOB, SECTION_TEMP_MEM)
        ]
        return sha384(build_td_hob(ranges, self.td_hob_base(), memory_size))

    def witness(self) -> bytes:
        """the TD HOB witness (version 1) of this firmware; ParseError when it has no single
        TD_HOB section, a range is empty, or ranges overlap."""
        hob_pages = [s.memory_address // PAGE for s in self.sections if s.type == SECTION_TD_HOB]
        if len(hob_pages) != 1:
            raise ParseError(f"tdvf metadata has {len(hob_pages)} TD_HOB sections, expected 1")
        ranges = self.accepted_ranges()
        end = None
        for start, count in ranges:
            if count == 0:
                raise ParseError("a TD_HOB or TEMP_MEM section is empty")
            if end is not None and start < end:
                raise ParseError("TD_HOB and TEMP_MEM sections overlap")
            end = start + count
        base = ranges[0][0]
        if hob_pages[0] < base:  # pragma: no cover - the TD_HOB section is one of the ranges
            raise ParseError("the TD_HOB page lies below the witness base")
        out = bytearray()
        for value in (base, hob_pages[0] - base, len(ranges)):
            out += _varuint(value)
        for start, count in ranges:
            out += _varuint(start - base) + _varuint(count)
        return bytes(out)


def _record(tag: bytes, gpa: int) -> bytes:
    return tag.ljust(16, b"\0") + struct.pack("<Q", gpa) + bytes(104)


def parse_sections(fw: bytes) -> tuple[TdvfSection, ...]:
    """the TDVF sections of a firmware image (see the module docstring for the layout)."""
    if len(fw) > MAX_FIRMWARE:
        raise ParseError(f"firmware larger than {MAX_FIRMWARE} bytes")
    end = len(fw) - BYTES_AFTER_TABLE
    if end < 18:
        raise ParseError("firmware too small to hold a guided table: it has no tdvf metadata")
    if fw[end - 16 : end] != TABLE_FOOTER_GUID.bytes_le:
        raise ParseError("firmware has no guided table footer: it has no tdvf metadata")
    (table_len,) = struct.unpack_from("<H", fw, end - 18)
    if not 18 <= table_len <= end:
        raise ParseError(f"firmware guided table length {table_len} is invalid")
    start, pos = end - table_len, end - 18
    descriptor_offset = None
    while pos - start >= 18:
        guid = fw[pos - 16 : pos]
        (entry_len,) = struct.unpack_from("<H", fw, pos - 18)
        if not 18 <= entry_len <= pos - start:
            raise ParseError(f"firmware guided table entry length {entry_len} is invalid")
        if guid == TDX_METADATA_GUID.bytes_le:
            if entry_len < 22:
                raise ParseError("firmware tdx metadata entry is too short")
            (descriptor_offset,) = struct.unpack_from("<I", fw, pos - 22)
            break
        pos -= entry_len
    if descriptor_offset is None:
        raise ParseError("firmware has no tdvf metadata (no tdx metadata guid in its table)")
    if not 0 < descriptor_offset <= len(fw):
        raise ParseError("tdvf metadata offset lies outside the firmware")
    at = len(fw) - descriptor_offset
    if at + _DESCRIPTOR.size > len(fw):
        raise ParseError("tdvf descriptor runs past the end of the firmware")
    signature, _length, version, count = _DESCRIPTOR.unpack_from(fw, at)
    if signature != b"TDVF":
        raise ParseError("tdvf descriptor signature is not 'TDVF'")
    if version != 1:
        raise ParseError(f"tdvf metadata version {version} is not supported")
    if count > MAX_SECTIONS:
        raise ParseError(f"tdvf metadata lists {count} sections, more than {MAX_SECTIONS}")
    if at + _DESCRIPTOR.size + count * _SECTION.size > len(fw):
        raise ParseError("tdvf sections run past the end of the firmware")
    sections = []
    pages = 0
    for i in range(count):
        s = TdvfSection(*_SECTION.unpack_from(fw, at + _DESCRIPTOR.size + i * _SECTION.size))
        if s.memory_address % PAGE or s.memory_data_size % PAGE:
            raise ParseError(f"tdvf section {i} is not page aligned")
        if s.memory_data_size < s.raw_data_size:
            raise ParseError(f"tdvf section {i} memory size is smaller than its raw size")
        if s.memory_address + s.memory_data_size > MAX_ADDRESS:
            raise ParseError(f"tdvf section {i} lies beyond the supported address range")
        if s.attributes & ATTR_MR_EXTEND and s.data_offset + s.memory_data_size > len(fw):
            raise ParseError(f"tdvf section {i} extends bytes beyond the end of the firmware")
        pages += s.pages
        if pages > MAX_PAGES:
            raise ParseError(f"tdvf sections cover more than {MAX_PAGES} pages")
        sections.append(s)
    return tuple(sections)


# ---------------------------------------------------------------------------------- TD HOB


def _accept(
    ranges: list[tuple[bool, int, int]], start: int, end: int
) -> list[tuple[bool, int, int]]:
    """mark [start, end) accepted, splitting the unaccepted ranges it overlaps."""
    if start >= end:
        return ranges
    out: list[tuple[bool, int, int]] = []
    for accepted, lo, hi in ranges:
        if accepted or hi <= start or lo >= end:
            out.append((accepted, lo, hi))
            continue
        if lo < start:
            out.append((False, lo, start))
        if hi > end:
            out.append((False, end, hi))
    out.append((True, start, end))
    return sorted(out, key=lambda r: r[1])


def build_td_hob(accepted: Sequence[tuple[int, int]], hob_base: int, memory_size: int) -> bytes:
    """the TD HOB bytes for guest RAM of `memory_size` bytes, with the byte ranges `accepted`
    (start, end) accepted by the firmware and the HOB list placed at `hob_base`."""
    if not 0 < memory_size < MAX_ADDRESS:
        raise ParseError(f"memory size {memory_size} is out of range")
    ranges: list[tuple[bool, int, int]] = [(False, 0, memory_size)]
    for start, end in accepted:
        if not 0 <= start <= end <= MAX_ADDRESS:
            raise ParseError("an accepted memory range lies beyond the supported address range")
        ranges = _accept(ranges, start, end)
    hob = bytearray(struct.pack("<HHIII", 0x0001, 56, 0, 9, 0) + bytes(40))

    def resource(kind: int, start: int, length: int) -> None:
        hob.extend(struct.pack("<HHI16sIIQQ", 0x0003, 48, 0, bytes(16), kind, 7, start, length))

    *head, (_, last_start, last_end) = ranges
    for accepted_range, start, end in head:
        resource(0x00 if accepted_range else 0x07, start, end - start)
    if last_end < last_start:  # pragma: no cover - _accept never builds such a range
        raise ParseError("invalid memory range")
    if memory_size >= HIGH_MEMORY:
        if last_start < LOW_SPLIT:
            resource(0x07, last_start, LOW_SPLIT - last_start)
        if last_end > LOW_SPLIT:
            resource(0x07, 0x100000000, last_end - LOW_SPLIT)
    else:
        resource(0x07, last_start, last_end - last_start)
    struct.pack_into("<Q", hob, 48, hob_base + len(hob) + 8)
    return bytes(hob)


def _varuint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varuint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ParseError("td hob witness is truncated")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 64:
            raise ParseError("td hob witness varint is too large")


def td_hob_digest_from_witness(witness: bytes, memory_size: int) -> bytes:
    """sha384 of the TD HOB rebuilt from a witness for `memory_size` bytes of RAM."""
    base, pos = _read_varuint(witness, 0)
    hob_delta, pos = _read_varuint(witness, pos)
    count, pos = _read_varuint(witness, pos)
    if count > (len(witness) - pos) // 2:
        raise ParseError(f"td hob witness claims {count} ranges but is too short for them")
    accepted = []
    for _ in range(count):
        delta, pos = _read_varuint(witness, pos)
        pages, pos = _read_varuint(witness, pos)
        start, length = (base + delta) * PAGE, pages * PAGE
        if start + length > MAX_ADDRESS:
            raise ParseError("td hob witness range lies beyond the supported address range")
        accepted.append((start, start + length))
    if pos != len(witness):
        raise ParseError("td hob witness has trailing bytes")
    hob_base = (base + hob_delta) * PAGE
    if hob_base >= MAX_ADDRESS:
        raise ParseError("td hob witness base lies beyond the supported address range")
    return sha384(build_td_hob(accepted, hob_base, memory_size))


# ---------------------------------------------------------------------------------- RTMR0

#: the configuration firmware volume, fixed for dstack's OVMF (pre-202505)
CFV_DIGEST = bytes.fromhex(
    "344bc51c980ba621aaa00da3ed7436f7d6e549197dfe699515dfa2c6583d95e6"
    "412af21c097d473155875ffd561d6790"
)
#: Boot0000 (OVMF's UiApp) of pre-202505 firmware
BOOT0000_DIGEST = bytes.fromhex(
    "23ada07f5261f12f34a0bd8e46760962d6b4d576a416f1fea1c64bc656b1d28e"
    "acf7047ae6e967c58fd2a98bfa74c298"
)
EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
SEPARATOR_DIGEST = sha384(bytes(4))
OVMF_VARIANTS = ("pre202505",)


def efi_variable_digest(vendor: uuid.UUID, name: str) -> bytes:
    """the digest of an (empty) EFI variable event: guid, name length, data length, name."""
    return sha384(vendor.bytes_le + struct.pack("<QQ", len(name), 0) + name.encode("utf-16-le"))


@dataclass(frozen=True)
class AcpiDigests:
    """the three RTMR0 `ACPI DATA` digests: table loader, RSDP, tables."""

    loader: bytes
    rsdp: bytes
    tables: bytes

    def __post_init__(self) -> None:
        for name in ("loader", "rsdp", "tables"):
            if len(getattr(self, name)) != 48:
                raise ParseError(f"acpi {name} digest must be 48 bytes")


def rtmr0_log(
    td_hob_digest: bytes, acpi: AcpiDigests, ovmf_variant: str = "pre202505"
) -> list[bytes]:
    """the 13 RTMR0 digests of dstack's pre-202505 OVMF."""
    if ovmf_variant not in OVMF_VARIANTS:
        raise ParseError(f"unsupported ovmf variant {ovmf_variant!r}")
    return [
        td_hob_digest,
        CFV_DIGEST,
        efi_variable_digest(EFI_GLOBAL_VARIABLE, "SecureBoot"),
        efi_variable_digest(EFI_GLOBAL_VARIABLE, "PK"),
        efi_variable_digest(EFI_GLOBAL_VARIABLE, "KEK"),
        efi_variable_digest(EFI_IMAGE_SECURITY_DATABASE, "db"),
        efi_variable_digest(EFI_IMAGE_SECURITY_DATABASE, "dbx"),
        SEPARATOR_DIGEST,
        acpi.loader,
        acpi.rsdp,
        acpi.tables,
        sha384(bytes(2)),  # BootOrder
        BOOT0000_DIGEST,
    ]
