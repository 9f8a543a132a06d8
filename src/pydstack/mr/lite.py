"""`measurement.tdx.cbor` (version 3): an image's TDX measurement material, and the lite check.

The document (CBOR map, byte strings as bstr, in this key order):
`{"version": 3, "image": {"cmdline_sha384", "kernel_authenticode", "initrd_sha384"}, "tdvf":
{"ovmf": "pre202505", "mrtd": {"single_pass", "two_pass"}, "td_hob": <witness>}}`. It is bound
to the image by `sha256sum.txt`: `os_image_hash = sha256(sha256sum.txt)` and the manifest's
line for `measurement.tdx.cbor` is the document's sha256.

Lite verification needs no image files: from `vm_config.tdx_measurement` (the manifest and the
document) and the three ACPI digests of the event log it rebuilds MRTD (the candidate for the
VM's QEMU page-add order), RTMR0 (the TD HOB from the witness for the VM's memory), RTMR1 and
RTMR2. The kernel digest in the document is the one for 0xB0000000 bytes of RAM, so lite
verification accepts only memory sizes of exactly 2 GiB or at least 0xB0000000 bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from pydstack.attest import cbor
from pydstack.attest.errors import ParseError, VerifyError

from .kernel import lite_memory_ok, rtmr1_log
from .machine import VmMeasureConfig
from .tdvf import (
    OVMF_VARIANTS,
    AcpiDigests,
    measure_log,
    rtmr0_log,
    td_hob_digest_from_witness,
)

FILENAME = "measurement.tdx.cbor"
CHECKSUM_FILE = "sha256sum.txt"
VERSION = 3
MAX_DOCUMENT = 64 * 1024
MAX_CHECKSUM_FILE = 1024 * 1024


@dataclass(frozen=True, slots=True)
class TdxMeasurements:
    mrtd: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes

    def to_json_obj(self) -> dict[str, str]:
        return {
            "mrtd": self.mrtd.hex(),
            "rtmr0": self.rtmr0.hex(),
            "rtmr1": self.rtmr1.hex(),
            "rtmr2": self.rtmr2.hex(),
        }


@dataclass(frozen=True)
class TdxImageMeasurement:
    """the image-static measurement material (upstream's TdxOsImageMeasurement)."""

    cmdline_sha384: bytes
    kernel_authenticode: bytes
    initrd_sha384: bytes
    mrtd_single_pass: bytes
    mrtd_two_pass: bytes
    td_hob_witness: bytes
    ovmf_variant: str = "pre202505"

    def to_cbor(self) -> bytes:
        return cbor.encode(
            {
                "version": VERSION,
                "image": {
                    "cmdline_sha384": self.cmdline_sha384,
                    "kernel_authenticode": self.kernel_authenticode,
                    "initrd_sha384": self.initrd_sha384,
                },
                "tdvf": {
                    "ovmf": self.ovmf_variant,
                    "mrtd": {"single_pass": self.mrtd_single_pass, "two_pass": self.mrtd_two_pass},
                    "td_hob": self.td_hob_witness,
                },
            }
        )

    @classmethod
    def from_cbor(cls, data: bytes) -> TdxImageMeasurement:
        """ParseError for anything but a version-3 document with 48-byte digests."""
        doc = cbor.decode(data, max_size=MAX_DOCUMENT)
        root = _map(doc, "measurement")
        if root.get("version") != VERSION:
            raise ParseError(
                f"tdx measurement version {str(root.get('version'))[:16]} is not supported "
                f"(expected {VERSION})"
            )
        image, tdvf = _map(root.get("image"), "image"), _map(root.get("tdvf"), "tdvf")
        mrtd = _map(tdvf.get("mrtd"), "tdvf.mrtd")
        ovmf = tdvf.get("ovmf")
        if ovmf not in OVMF_VARIANTS:
            raise ParseError(f"tdx measurement ovmf variant {str(ovmf)[:32]!r} is not supported")
        witness = tdvf.get("td_hob")
        if not isinstance(witness, bytes) or len(witness) > 4096:
            raise ParseError("tdx measurement tdvf.td_hob must be a byte string of at most 4 KiB")
        return cls(
            cmdline_sha384=_digest(image, "cmdline_sha384"),
            kernel_authenticode=_digest(image, "kernel_authenticode"),
            initrd_sha384=_digest(image, "initrd_sha384"),
            mrtd_single_pass=_digest(mrtd, "single_pass"),
            mrtd_two_pass=_digest(mrtd, "two_pass"),
            td_hob_witness=witness,
            ovmf_variant=ovmf,
        )

    def measurements(self, vm: VmMeasureConfig, acpi: AcpiDigests) -> TdxMeasurements:
        """the expected MRTD and RTMR0-2 of a VM booted from this image; VerifyError when the
        VM's configuration is one lite verification cannot check."""
        memory = vm.require_memory()
        if not lite_memory_ok(memory):
            raise VerifyError(
                f"lite verification needs memory_size of exactly {0x80000000} bytes (2 GiB) or "
                f"at least {0xB0000000} bytes, got {memory}"
            )
        if vm.ovmf_variant is not None and vm.ovmf_variant != self.ovmf_variant:
            raise VerifyError(
                f"ovmf variant mismatch: vm_config says {vm.ovmf_variant}, the image "
                f"{self.ovmf_variant}"
            )
        hob = td_hob_digest_from_witness(self.td_hob_witness, memory)
        return TdxMeasurements(
            mrtd=self.mrtd_two_pass if vm.two_pass() else self.mrtd_single_pass,
            rtmr0=measure_log(rtmr0_log(hob, acpi, self.ovmf_variant)),
            rtmr1=measure_log(rtmr1_log(self.kernel_authenticode)),
            rtmr2=measure_log([self.cmdline_sha384, self.initrd_sha384]),
        )


def _map(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ParseError(f"tdx measurement {what} must be a map")
    return obj


def _digest(obj: dict[str, Any], key: str) -> bytes:
    value = obj.get(key)
    if not isinstance(value, bytes) or len(value) != 48:
        raise ParseError(f"tdx measurement {key} must be a 48-byte byte string")
    return value


def checksum_entry(checksum_file: bytes, filename: str) -> bytes:
    """the sha256 `sha256sum.txt` lists for `filename`; ParseError when it lists it not exactly
    once, or the manifest is malformed."""
    if len(checksum_file) > MAX_CHECKSUM_FILE:
        raise ParseError(f"{CHECKSUM_FILE} larger than {MAX_CHECKSUM_FILE} bytes")
    try:
        text = checksum_file.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParseError(f"{CHECKSUM_FILE} is not utf-8") from e
    found = None
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise ParseError(f"{CHECKSUM_FILE} line {number} has no file name")
        if parts[1].removeprefix("*") != filename:
            continue
        if found is not None:
            raise ParseError(f"{CHECKSUM_FILE} lists {filename} more than once")
        try:
            found = bytes.fromhex(parts[0])
        except ValueError as e:
            raise ParseError(f"{CHECKSUM_FILE} hash of {filename} is not hex") from e
        if len(found) != 32:
            raise ParseError(f"{CHECKSUM_FILE} hash of {filename} is not 32 bytes")
    if found is None:
        raise ParseError(f"{CHECKSUM_FILE} does not list {filename}")
    return found


def image_hash(checksum_file: bytes) -> bytes:
    """an image's identity: sha256 of its `sha256sum.txt`."""
    return hashlib.sha256(checksum_file).digest()


def verify_material(os_image_hash: bytes, checksum_file: bytes, measurement: bytes) -> None:
    """VerifyError unless the manifest is the image's and lists the document's digest."""
    actual = image_hash(checksum_file)
    if actual != os_image_hash:
        raise VerifyError(
            f"os_image_hash {os_image_hash.hex()} is not sha256({CHECKSUM_FILE}) ({actual.hex()})"
        )
    listed = checksum_entry(checksum_file, FILENAME)
    if hashlib.sha256(measurement).digest() != listed:
        raise VerifyError(f"{FILENAME} does not match its {CHECKSUM_FILE} entry")


def lite_measurements(vm: VmMeasureConfig, acpi: AcpiDigests) -> TdxMeasurements:
    """the expected registers of a lite VM from its `tdx_measurement`; VerifyError (or
    ParseError) naming what does not hold."""
    if vm.tdx_measurement is None:
        raise VerifyError("lite verification needs vm_config.tdx_measurement")
    checksum_file, measurement = vm.tdx_measurement
    verify_material(vm.os_image_hash, checksum_file, measurement)
    return TdxImageMeasurement.from_cbor(measurement).measurements(vm, acpi)
