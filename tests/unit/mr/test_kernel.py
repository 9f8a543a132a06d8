"""QEMU's kernel patch and the Authenticode SHA-384 of RTMR1, against an independent reading of
the PE fields; which memory sizes share the digest an image ships."""

from __future__ import annotations

import struct

import pytest

from pydstack.attest.errors import ParseError
from pydstack.mr.kernel import (
    authenticode_sha384,
    cmdline_digest,
    kernel_digest,
    lite_memory_ok,
    patch_kernel,
)

from .synth import expected_authenticode, pe_kernel

GIB = 1 << 30


@pytest.mark.parametrize(("cert", "tail"), [(False, b""), (True, b""), (False, b"odd")])
def test_authenticode_matches_an_independent_computation(cert, tail):
    img = pe_kernel(cert=cert) + tail  # an odd length is padded to a multiple of 8
    assert authenticode_sha384(img) == expected_authenticode(img)


def test_authenticode_skips_checksum_and_certificate_entry():
    img = bytearray(pe_kernel())
    base = authenticode_sha384(bytes(img))
    struct.pack_into("<I", img, 0x80 + 24 + 64, 0x12345678)  # the checksum field
    assert authenticode_sha384(bytes(img)) == base
    img[0x1500] ^= 1  # a section byte
    assert authenticode_sha384(bytes(img)) != base


def _initrd_addr(kernel: bytes) -> int:
    return int(struct.unpack_from("<I", kernel, 0x218)[0])


def test_patch_writes_the_loader_fields():
    patched = patch_kernel(pe_kernel(), 0x100000, 2 * GIB)
    assert patched[0x210] == 0xB0
    assert patched[0x211] & 0x80
    assert struct.unpack_from("<I", patched, 0x228)[0] == 0x20000
    assert struct.unpack_from("<I", patched, 0x21C)[0] == 0x100000
    # 2 GiB - acpi data, less the initrd, page aligned
    assert _initrd_addr(patched) == (2 * GIB - 0x28000 - 1 - 0x100000) & ~0xFFF


def test_the_shipped_digest_holds_at_2g_and_high_memory():
    k = pe_kernel()
    at = {
        m: _initrd_addr(patch_kernel(k, 0x100000, m)) for m in (GIB, 2 * GIB, 0xB0000000, 8 * GIB)
    }
    assert at[2 * GIB] == at[0xB0000000] == at[8 * GIB] != at[GIB]
    below = _initrd_addr(patch_kernel(k, 0x100000, 0xB0000000 - 0x1000))
    assert below != at[0xB0000000]
    assert kernel_digest(k, 0x100000, 2 * GIB) == kernel_digest(k, 0x100000, 16 * GIB)
    assert [lite_memory_ok(m) for m in (GIB, 2 * GIB, 3 * GIB - 1, 0xB0000000)] == [
        False,
        True,
        True,
        True,
    ]
    assert not lite_memory_ok(0xB0000000 - 1)


@pytest.mark.parametrize(
    ("kernel", "initrd", "reason"),
    [
        (b"\0" * 100, 0, "too short"),
        (b"\0" * 0x1000, 1, "too old for an initrd"),
        (pe_kernel(), 0xFFFFFFF0, "too large"),
    ],
)
def test_kernels_qemu_refuses(kernel, initrd, reason):
    with pytest.raises(ParseError, match=reason):
        patch_kernel(kernel, initrd, 2 * GIB)


def test_non_pe_images_are_refused():
    with pytest.raises(ParseError, match="pe signature"):
        authenticode_sha384(b"\0" * 0x1000)
    bad = bytearray(pe_kernel())
    struct.pack_into("<I", bad, 0x80 + 24 + 60, 0x10)  # SizeOfHeaders inside the headers
    with pytest.raises(ParseError, match="inconsistent"):
        authenticode_sha384(bytes(bad))
    far = bytearray(pe_kernel())
    struct.pack_into("<I", far, 0x3C, 0xFFFFFF00)
    with pytest.raises(ParseError, match="too short"):
        authenticode_sha384(bytes(far))


def test_cmdline_digest_is_utf16_with_a_nul():
    import hashlib

    assert cmdline_digest("a b") == hashlib.sha384("a b".encode("utf-16-le") + b"\0\0").digest()
