"""the kernel's measurements: QEMU's setup-header patch, Authenticode SHA-384, RTMR1 and RTMR2.

QEMU's x86 direct-boot loader writes into the kernel's setup header before OVMF measures the
kernel as a PE image (EV_EFI_BOOT_SERVICES_APPLICATION, the first RTMR1 event): loader type,
heap end and command line pointers, and the initrd address and size. The initrd address
depends on the RAM below 4 GiB (QEMU q35: all of it below 0xB0000000 bytes of RAM, else 2 GiB)
less the ACPI data size (0x28000 for dstack's VMs), so the digest is the same for every memory
size of 0xB0000000 or more and for exactly 2 GiB.

The Authenticode digest hashes the PE headers without the checksum and the certificate table
entry, then each section's raw data in file order, then data after the last section that is not
the certificate table, then zero padding to a multiple of 8 bytes (as dstack-mr computes it).

RTMR1 is that digest followed by four fixed events; RTMR2 is the command line (UTF-16LE with a
terminating NUL, the image's command line plus " initrd=initrd") and the initrd.
"""

from __future__ import annotations

import hashlib
import struct

from pydstack.attest.errors import ParseError

from .tdvf import HIGH_MEMORY, LOW_SPLIT, SEPARATOR_DIGEST, sha384

ACPI_DATA_SIZE = 0x28000
MIN_KERNEL = 0x1000
#: the largest kernel read (a bzImage is 10-20 MiB)
MAX_KERNEL = 256 * 1024 * 1024
PE_SIGNATURE = 0x00004550
CERT_TABLE_INDEX = 4


def lite_memory_ok(memory_size: int) -> bool:
    """whether the kernel digest for `memory_size` is the one an image ships (computed at
    0xB0000000): exactly 2 GiB or at least 0xB0000000 bytes."""
    return memory_size == LOW_SPLIT or memory_size >= HIGH_MEMORY


def _u16(data: bytes | bytearray, at: int, what: str) -> int:
    if at < 0 or at + 2 > len(data):
        raise ParseError(f"kernel image too short for its {what}")
    return int(struct.unpack_from("<H", data, at)[0])


def _u32(data: bytes | bytearray, at: int, what: str) -> int:
    if at < 0 or at + 4 > len(data):
        raise ParseError(f"kernel image too short for its {what}")
    return int(struct.unpack_from("<I", data, at)[0])


def patch_kernel(
    kernel: bytes, initrd_size: int, memory_size: int, acpi_data_size: int = ACPI_DATA_SIZE
) -> bytes:
    """the kernel as QEMU hands it to the firmware; ParseError when QEMU would refuse it."""
    if len(kernel) < MIN_KERNEL:
        raise ParseError("the kernel image is too short")
    if not 0 <= initrd_size < 1 << 32:
        raise ParseError("the initrd is too large")
    kd = bytearray(kernel)
    protocol = _u16(kd, 0x206, "boot protocol version")
    if protocol < 0x200 or not kd[0x211] & 0x01:
        real_addr, cmdline_addr = 0x90000, 0x9A000
    else:
        real_addr, cmdline_addr = 0x10000, 0x20000
    if protocol >= 0x200:
        kd[0x210] = 0xB0  # type_of_loader: QEMU
    if protocol >= 0x201:
        kd[0x211] |= 0x80  # CAN_USE_HEAP
        struct.pack_into("<I", kd, 0x224, max(cmdline_addr - real_addr - 0x200, 0))
    if protocol >= 0x202:
        struct.pack_into("<I", kd, 0x228, cmdline_addr)
    else:
        struct.pack_into("<HH", kd, 0x20, 0xA33F, cmdline_addr - real_addr)
    if initrd_size > 0:
        if protocol < 0x200:
            raise ParseError("the kernel image is too old for an initrd")
        if protocol >= 0x20C:
            initrd_max = 0xFFFFFFFF if _u16(kd, 0x236, "xloadflags") & 0x40 else 0x37FFFFFF
        elif protocol >= 0x203:
            initrd_max = _u32(kd, 0x22C, "initrd_addr_max") or 0x37FFFFFF
        else:
            initrd_max = 0x37FFFFFF
        lowmem = HIGH_MEMORY if memory_size < HIGH_MEMORY else LOW_SPLIT
        below_4g = lowmem if memory_size >= lowmem else memory_size
        available = below_4g - acpi_data_size
        if available < 0:
            raise ParseError(
                f"acpi data size {acpi_data_size} exceeds the memory below 4 GiB ({below_4g})"
            )
        if initrd_max >= available:
            initrd_max = max(available - 1, 0)
        if initrd_size >= initrd_max:
            raise ParseError("the initrd is too large for the guest memory")
        initrd_addr = (initrd_max - initrd_size) & ~0xFFF
        struct.pack_into("<II", kd, 0x218, initrd_addr, initrd_size)
    return bytes(kd)


def authenticode_sha384(image: bytes) -> bytes:
    """the Authenticode SHA-384 of a PE image; ParseError when it is not one."""
    lfanew = _u32(image, 0x3C, "dos header")
    if _u32(image, lfanew, "pe signature") != PE_SIGNATURE:
        raise ParseError("kernel image has no pe signature")
    coff = lfanew + 4
    optional_size = _u16(image, coff + 16, "coff header")
    optional = coff + 20
    pe32_plus = _u16(image, optional, "optional header magic") == 0x20B
    checksum = optional + 64
    cert_entry = optional + (112 if pe32_plus else 96) + CERT_TABLE_INDEX * 8
    headers_size = _u32(image, optional + 60, "size of headers")
    if not (checksum + 4 <= cert_entry and cert_entry + 8 <= headers_size <= len(image)):
        raise ParseError("kernel image pe headers are inconsistent")
    h = hashlib.sha384()
    h.update(image[:checksum])
    h.update(image[checksum + 4 : cert_entry])
    h.update(image[cert_entry + 8 : headers_size])
    hashed = headers_size
    count = _u16(image, coff + 2, "section count")
    table = optional + optional_size
    sections = []
    for i in range(count):
        size = _u32(image, table + 40 * i + 16, "section table")
        offset = _u32(image, table + 40 * i + 20, "section table")
        if size:
            sections.append((offset, size))
    for offset, size in sorted(sections):
        h.update(image[offset : offset + size])
        hashed += size
    cert_addr = _u32(image, cert_entry, "certificate table entry")
    cert_size = _u32(image, cert_entry + 4, "certificate table entry")
    if cert_addr and cert_size and len(image) > hashed:
        trailing = len(image) - hashed
        if trailing > cert_size and hashed + trailing - cert_size <= len(image):
            h.update(image[hashed : hashed + trailing - cert_size])
    if len(image) % 8:
        h.update(bytes(8 - len(image) % 8))
    return h.digest()


def kernel_digest(kernel: bytes, initrd_size: int, memory_size: int) -> bytes:
    """the first RTMR1 event: Authenticode SHA-384 of the QEMU-patched kernel."""
    return authenticode_sha384(patch_kernel(kernel, initrd_size, memory_size))


def rtmr1_log(kernel_authenticode: bytes) -> list[bytes]:
    if len(kernel_authenticode) != 48:
        raise ParseError("the kernel authenticode digest must be 48 bytes")
    return [
        kernel_authenticode,
        sha384(b"Calling EFI Application from Boot Option"),
        SEPARATOR_DIGEST,
        sha384(b"Exit Boot Services Invocation"),
        sha384(b"Exit Boot Services Returned with Success"),
    ]


def measured_cmdline(image_cmdline: str) -> str:
    """the command line OVMF measures: the image's plus QEMU's initrd argument."""
    return f"{image_cmdline} initrd=initrd"


def cmdline_digest(cmdline: str) -> bytes:
    """sha384 of the command line in UTF-16LE with a terminating NUL."""
    return sha384(cmdline.encode("utf-16-le") + b"\0\0")
