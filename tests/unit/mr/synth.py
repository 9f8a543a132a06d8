"""synthetic OS image parts for dstack-mr tests: TDVF firmware, a PE kernel, image directories.

Debian's OVMF has no TDX build, so the tests build firmware with OVMF's GUIDed table and TDVF
metadata themselves, and compute what the TDX module would measure independently of
`pydstack.mr` (one byte stream per the TDX module's MRTD definition, hashed at once).
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

FOOTER = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d").bytes_le
TDX_META = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2").bytes_le
OTHER_GUID = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff").bytes_le
FW_SIZE = 0x40000


@dataclass(frozen=True)
class Sec:
    type: int
    attributes: int
    address: int
    size: int
    data_offset: int = 0
    raw_size: int = 0


#: dstack's OVMF layout: BFV (extended), CFV, TD HOB and three TEMP_MEM ranges
LAYOUT = (
    Sec(0, 1, 0xFFFC0000, 0x8000, data_offset=0x30000, raw_size=0x8000),
    Sec(1, 0, 0xFFFB0000, 0x2000, data_offset=0x20000, raw_size=0x2000),
    Sec(3, 0, 0x810000, 0x10000),
    Sec(3, 0, 0x80B000, 0x2000),
    Sec(2, 0, 0x809000, 0x2000),
    Sec(3, 2, 0x800000, 0x6000),  # PAGE_AUG: accepted, never page-added
)


def firmware(
    sections: tuple[Sec, ...] = LAYOUT, *, seed: bytes = b"fw", size: int = FW_SIZE
) -> bytes:
    """a firmware image of `size` bytes whose GUIDed table points at TDVF metadata listing
    `sections`."""
    fw = bytearray(hashlib.shake_256(seed).digest(size))
    meta_at = 0x1000
    meta = struct.pack("<4sIII", b"TDVF", 16 + 32 * len(sections), 1, len(sections))
    for s in sections:
        meta += struct.pack(
            "<IIQQII", s.data_offset, s.raw_size, s.address, s.size, s.type, s.attributes
        )
    fw[meta_at : meta_at + len(meta)] = meta
    entry = struct.pack("<I", size - meta_at) + struct.pack("<H", 22) + TDX_META
    other = b"\xaa" * 6 + struct.pack("<H", 24) + OTHER_GUID  # an unrelated entry before it
    table = other + entry
    footer = struct.pack("<H", len(table) + 18) + FOOTER
    end = size - 32
    fw[end - len(table) - 18 : end] = table + footer
    return bytes(fw)


def expected_mrtd(fw: bytes, sections: tuple[Sec, ...], *, two_pass: bool) -> bytes:
    """MRTD as the TDX module defines it: sha384 over the 128-byte MEM.PAGE.ADD records and the
    MR.EXTEND records each followed by its 256 bytes, in the order QEMU issues them."""
    stream: list[bytes] = []

    def record(tag: bytes, gpa: int) -> bytes:
        body = tag + b"\0" * (16 - len(tag)) + gpa.to_bytes(8, "little")
        return body + b"\0" * (128 - len(body))

    for s in sections:
        pages = range(s.size // 0x1000)
        adds = (
            []
            if s.attributes & 2
            else [record(b"MEM.PAGE.ADD", s.address + p * 0x1000) for p in pages]
        )
        extends = []
        if s.attributes & 1:
            for p in pages:
                chunks = []
                for c in range(16):
                    off = p * 0x1000 + c * 0x100
                    chunks.append(record(b"MR.EXTEND", s.address + off))
                    chunks.append(fw[s.data_offset + off : s.data_offset + off + 0x100])
                extends.append(b"".join(chunks))
        if two_pass:
            stream += adds + extends
        elif adds and extends:
            stream += [a + e for a, e in zip(adds, extends, strict=True)]
        else:
            stream += adds + extends
    return hashlib.sha384(b"".join(stream)).digest()


# ---------------------------------------------------------------------------------- kernel


def pe_kernel(*, cert: bool = False, seed: bytes = b"kernel", text: int = 0x1000) -> bytes:
    """a PE32+ image with a Linux boot protocol 2.15 setup header (initrd above 4 GiB allowed)
    and two sections (the second `text` bytes); `cert` appends a certificate table after
    trailing data."""
    size = 0x2400 + text + 0xC00
    img = bytearray(hashlib.shake_256(seed).digest(size))
    img[0:2] = b"MZ"
    lfanew = 0x80
    struct.pack_into("<I", img, 0x3C, lfanew)
    img[lfanew : lfanew + 4] = b"PE\0\0"
    coff = lfanew + 4
    optional = coff + 20
    optional_size = 240
    struct.pack_into("<HHIIIHH", img, coff, 0x8664, 2, 0, 0, 0, optional_size, 0x22)
    struct.pack_into("<H", img, optional, 0x20B)
    struct.pack_into("<I", img, optional + 60, 0x400)  # SizeOfHeaders
    struct.pack_into("<I", img, optional + 108, 16)  # NumberOfRvaAndSizes
    struct.pack_into("<II", img, optional + 112 + 4 * 8, 0, 0)  # no certificate table yet
    table = optional + optional_size
    for i, (ptr, raw) in enumerate([(0x1400, 0x1000 + text), (0x400, 0x1000)]):  # not in file order
        entry = table + 40 * i
        img[entry : entry + 8] = f".s{i}".encode().ljust(8, b"\0")
        struct.pack_into("<II", img, entry + 16, raw, ptr)
    # the linux setup header
    struct.pack_into("<H", img, 0x206, 0x020F)
    img[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<H", img, 0x236, 0x0040)  # XLF_CAN_BE_LOADED_ABOVE_4G
    if cert:
        img += b"trailing data!!!" + b"CERT" * 8
        struct.pack_into("<II", img, optional + 112 + 4 * 8, size + 16, 32)
    return bytes(img)


def expected_authenticode(img: bytes) -> bytes:
    """Authenticode SHA-384 as dstack-mr defines it, computed from the PE fields directly."""
    lfanew = int.from_bytes(img[0x3C:0x40], "little")
    optional = lfanew + 24
    plus = img[optional : optional + 2] == b"\x0b\x02"
    checksum = optional + 64
    cert_entry = optional + (112 if plus else 96) + 32
    headers = int.from_bytes(img[optional + 60 : optional + 64], "little")
    parts = [img[:checksum], img[checksum + 4 : cert_entry], img[cert_entry + 8 : headers]]
    count = int.from_bytes(img[lfanew + 6 : lfanew + 8], "little")
    table = optional + int.from_bytes(img[lfanew + 20 : lfanew + 22], "little")
    secs = sorted(
        (
            int.from_bytes(img[table + 40 * i + 20 : table + 40 * i + 24], "little"),
            int.from_bytes(img[table + 40 * i + 16 : table + 40 * i + 20], "little"),
        )
        for i in range(count)
    )
    parts += [img[p : p + n] for p, n in secs if n]
    done = headers + sum(n for _, n in secs)
    cert_addr = int.from_bytes(img[cert_entry : cert_entry + 4], "little")
    cert_size = int.from_bytes(img[cert_entry + 4 : cert_entry + 8], "little")
    if cert_addr and cert_size and len(img) - done > cert_size:
        parts.append(img[done : len(img) - cert_size])
    if len(img) % 8:
        parts.append(b"\0" * (8 - len(img) % 8))
    return hashlib.sha384(b"".join(parts)).digest()


# ---------------------------------------------------------------------------------- images


def image_dir(
    path: Path,
    *,
    fw: bytes | None = None,
    kernel: bytes | None = None,
    initrd: bytes = b"initrd" * 1000,
    cmdline: str = "console=ttyS0 dstack.rootfs_hash=00",
    extra: dict[str, object] | None = None,
) -> bytes:
    """a TDX image directory (upstream's layout); returns its os_image_hash."""
    path.mkdir(parents=True, exist_ok=True)
    files = {
        "ovmf.fd": firmware() if fw is None else fw,
        "bzImage": pe_kernel() if kernel is None else kernel,
        "initramfs.cpio.gz": initrd,
    }
    meta = {
        "bios": "ovmf.fd",
        "kernel": "bzImage",
        "initrd": "initramfs.cpio.gz",
        "cmdline": cmdline,
        "version": "0.6.0",
        "is_dev": False,
        **(extra or {}),
    }
    files["metadata.json"] = json.dumps(meta).encode()
    for name, data in files.items():
        (path / name).write_bytes(data)
    checksum = "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in sorted(files.items()))
    (path / "sha256sum.txt").write_text(checksum)
    return hashlib.sha256(checksum.encode()).digest()
