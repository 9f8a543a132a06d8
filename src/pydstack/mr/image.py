"""an OS image directory: its identity (`os_image_hash`) and what a CVM booted from it measures.

Two kinds:

* a TDX image (upstream's layout): `metadata.json` (`bios`, `kernel`, `initrd`, `cmdline`,
  `version`, `is_dev`, `ovmf_variant`), the files it names, and `sha256sum.txt` listing them;
  the identity is sha256(`sha256sum.txt`) (a `digest.txt`, if present, must say the same), and
  every file read is checked against its manifest line;
* a sandbox image (`metadata.json` with `"kind": "sandbox"`, the VMM's built-in guest): the
  identity is `digest.txt`; the simulated TD derives MRTD/RTMR0-2 from it, and the image ships
  them in `measurement.sandbox.json` (:func:`sandbox_measurement_doc`).

File names in `metadata.json` must be plain names inside the directory. Reading is bounded
(firmware 64 MiB, kernel 256 MiB, initrd 1 GiB). Errors: :class:`ImageError` for a directory
that is not a usable image, VerifyError when a file does not match the manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydstack.attest.errors import ParseError, VerifyError
from pydstack.tee.simulated import synthetic_measurements
from pydstack.types.capped import read_capped

from .kernel import MAX_KERNEL, cmdline_digest, kernel_digest, measured_cmdline, rtmr1_log
from .lite import CHECKSUM_FILE, TdxImageMeasurement, TdxMeasurements, checksum_entry
from .machine import VmMeasureConfig
from .tdvf import (
    HIGH_MEMORY,
    MAX_FIRMWARE,
    OVMF_VARIANTS,
    AcpiDigests,
    Tdvf,
    measure_log,
    rtmr0_log,
    sha384,
)

METADATA = "metadata.json"
DIGEST_FILE = "digest.txt"
SANDBOX_KIND = "sandbox"
SANDBOX_MEASUREMENT = "measurement.sandbox.json"
#: a qemu development image's expected registers under the VMM's simulated TD (its firmware
#: has no TDVF, so dstack-mr cannot measure it for real TDX)
SIMULATED_KIND = "simulated"
SIMULATED_MEASUREMENT = "measurement.simulated.json"
MAX_INITRD = 1024 * 1024 * 1024
MAX_SMALL_FILE = 1024 * 1024


class ImageError(VerifyError):
    """a directory is not a usable OS image."""


@dataclass(frozen=True)
class PartialMeasurements:
    """an image's measurements for one VM configuration, RTMR0 without its ACPI digests."""

    mrtd: bytes
    td_hob_digest: bytes
    rtmr1: bytes
    rtmr2: bytes
    ovmf_variant: str

    def complete(self, acpi: AcpiDigests) -> TdxMeasurements:
        rtmr0 = measure_log(rtmr0_log(self.td_hob_digest, acpi, self.ovmf_variant))
        return TdxMeasurements(self.mrtd, rtmr0, self.rtmr1, self.rtmr2)

    def to_json_obj(self) -> dict[str, str]:
        return {
            "mrtd": self.mrtd.hex(),
            "td_hob_digest": self.td_hob_digest.hex(),
            "rtmr1": self.rtmr1.hex(),
            "rtmr2": self.rtmr2.hex(),
            "ovmf_variant": self.ovmf_variant,
        }

    @classmethod
    def from_json_obj(cls, obj: Any) -> PartialMeasurements:
        """ParseError unless `obj` is what :meth:`to_json_obj` writes."""
        try:
            out = cls(
                bytes.fromhex(obj["mrtd"]),
                bytes.fromhex(obj["td_hob_digest"]),
                bytes.fromhex(obj["rtmr1"]),
                bytes.fromhex(obj["rtmr2"]),
                str(obj["ovmf_variant"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ParseError(f"malformed cached measurement: {e}") from e
        if any(len(v) != 48 for v in (out.mrtd, out.td_hob_digest, out.rtmr1, out.rtmr2)):
            raise ParseError("malformed cached measurement: digests must be 48 bytes")
        return out


def sandbox_measurements(digest_hex: str) -> TdxMeasurements:
    """what a sandbox CVM booted from the image with this digest measures."""
    return TdxMeasurements(*synthetic_measurements(digest_hex))


def simulated_measurement_doc(digest_hex: str) -> bytes:
    """the `measurement.simulated.json` a qemu development image ships: what the VMM's
    simulated TD measures for it (the same derivation as a sandbox image's)."""
    return sandbox_measurement_doc(digest_hex)


def sandbox_measurement_doc(digest_hex: str) -> bytes:
    """the `measurement.sandbox.json` a sandbox image ships."""
    doc = {
        "version": 1,
        "os_image_hash": digest_hex,
        **sandbox_measurements(digest_hex).to_json_obj(),
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def _plain_name(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value or "/" in value or value in (".", ".."):
        raise ImageError(f"{METADATA} {key} must be a file name in the image directory")
    return value


def _read(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = read_capped(f, limit)
    except OSError as e:
        raise ImageError(f"cannot read image file {path.name}: {e.strerror}") from e
    if len(data) > limit:
        raise ImageError(f"image file {path.name} is larger than {limit} bytes")
    return data


@dataclass(frozen=True)
class ImageDir:
    path: Path
    metadata: dict[str, Any]
    identity: bytes
    checksum_file: bytes | None

    @property
    def kind(self) -> str:
        """`sandbox`, `simulated` (an image shipping the registers of the VMM's simulated TD,
        which a quote of real TDX never has) or `tdx`."""
        if self.metadata.get("kind") == SANDBOX_KIND:
            return SANDBOX_KIND
        if (self.path / SIMULATED_MEASUREMENT).exists():
            return SIMULATED_KIND
        return "tdx"

    @property
    def version(self) -> str | None:
        v = self.metadata.get("version")
        return v if isinstance(v, str) and v else None

    @property
    def is_dev(self) -> bool:
        return self.metadata.get("is_dev") is True

    @classmethod
    def open(cls, path: Path) -> ImageDir:
        """an image directory and its identity; ImageError when it is not one."""
        raw = _read(path / METADATA, MAX_SMALL_FILE)
        try:
            metadata = json.loads(raw)
        except ValueError as e:
            raise ImageError(f"{METADATA} of {path.name} is not valid json") from e
        if not isinstance(metadata, dict):
            raise ImageError(f"{METADATA} of {path.name} must be an object")
        checksum = None
        if (path / CHECKSUM_FILE).exists():
            checksum = _read(path / CHECKSUM_FILE, MAX_SMALL_FILE)
        digest = None
        if (path / DIGEST_FILE).exists():
            text = _read(path / DIGEST_FILE, 1024).decode("ascii", "replace").strip()
            try:
                digest = bytes.fromhex(text)
            except ValueError as e:
                raise ImageError(f"{DIGEST_FILE} of {path.name} is not hex") from e
        if checksum is not None:
            identity = hashlib.sha256(checksum).digest()
            if digest is not None and digest != identity:
                raise ImageError(f"{DIGEST_FILE} of {path.name} is not sha256({CHECKSUM_FILE})")
        elif digest is not None and metadata.get("kind") == SANDBOX_KIND:
            identity = digest
        else:
            raise ImageError(f"image {path.name} has no {CHECKSUM_FILE}")
        return cls(path, metadata, identity, checksum)

    def read(self, name: str, limit: int) -> bytes:
        """a file of the image, checked against its `sha256sum.txt` line."""
        data = _read(self.path / name, limit)
        if self.checksum_file is None:
            raise ImageError(f"image {self.path.name} has no {CHECKSUM_FILE}")
        try:
            listed = checksum_entry(self.checksum_file, name)
        except ParseError as e:
            raise ImageError(str(e)) from e
        if hashlib.sha256(data).digest() != listed:
            raise VerifyError(f"image file {name} does not match its {CHECKSUM_FILE} entry")
        return data

    def _ovmf_variant(self) -> str:
        variant = self.metadata.get("ovmf_variant", OVMF_VARIANTS[0])
        if variant not in OVMF_VARIANTS:
            raise ImageError(f"{METADATA} ovmf_variant {str(variant)[:32]!r} is not supported")
        return str(variant)

    def _files(self) -> tuple[bytes, bytes, bytes, str]:
        if self.kind == SANDBOX_KIND:
            raise ImageError(f"image {self.path.name} is a sandbox image: it has no firmware")
        self.read(METADATA, MAX_SMALL_FILE)  # the metadata is part of the identity too
        cmdline = self.metadata.get("cmdline")
        if not isinstance(cmdline, str) or not cmdline.strip():
            raise ImageError(f"{METADATA} cmdline is required for tdx measurement")
        firmware = self.read(_plain_name(self.metadata.get("bios"), "bios"), MAX_FIRMWARE)
        kernel = self.read(_plain_name(self.metadata.get("kernel"), "kernel"), MAX_KERNEL)
        initrd = self.read(_plain_name(self.metadata.get("initrd"), "initrd"), MAX_INITRD)
        return firmware, kernel, initrd, cmdline

    def partial(self, vm: VmMeasureConfig) -> PartialMeasurements:
        """MRTD, the TD HOB digest, RTMR1 and RTMR2 for `vm`; ParseError when the firmware
        has no TDVF metadata or the kernel is not a PE image."""
        if self.kind == SANDBOX_KIND:
            raise ImageError("a sandbox image has no partial measurement")
        firmware, kernel, initrd, cmdline = self._files()
        memory = vm.require_memory()
        tdvf = Tdvf.parse(firmware)
        return PartialMeasurements(
            mrtd=tdvf.mrtd(two_pass=vm.two_pass()),
            td_hob_digest=tdvf.td_hob_digest(memory),
            rtmr1=measure_log(rtmr1_log(kernel_digest(kernel, len(initrd), memory))),
            rtmr2=measure_log([cmdline_digest(measured_cmdline(cmdline)), sha384(initrd)]),
            ovmf_variant=self._ovmf_variant(),
        )

    def material(self) -> TdxImageMeasurement:
        """the `measurement.tdx.cbor` document of this image."""
        firmware, kernel, initrd, cmdline = self._files()
        tdvf = Tdvf.parse(firmware)
        return TdxImageMeasurement(
            cmdline_sha384=cmdline_digest(measured_cmdline(cmdline)),
            kernel_authenticode=kernel_digest(kernel, len(initrd), HIGH_MEMORY),
            initrd_sha384=sha384(initrd),
            mrtd_single_pass=tdvf.mrtd(two_pass=False),
            mrtd_two_pass=tdvf.mrtd(two_pass=True),
            td_hob_witness=tdvf.witness(),
            ovmf_variant=self._ovmf_variant(),
        )

    def sandbox_measurements(self) -> TdxMeasurements:
        """the expected registers of a sandbox (or simulated) image: its
        `measurement.sandbox.json` (`measurement.simulated.json`) when it ships one (it must be
        for this image), else computed from its digest."""
        digest_hex = self.identity.hex()
        name = SIMULATED_MEASUREMENT if self.kind == SIMULATED_KIND else SANDBOX_MEASUREMENT
        path = self.path / name
        if not path.exists():
            return sandbox_measurements(digest_hex)
        raw = _read(path, MAX_SMALL_FILE)
        try:
            doc = json.loads(raw)
            owner = doc.get("os_image_hash")
            values = [bytes.fromhex(doc[k]) for k in ("mrtd", "rtmr0", "rtmr1", "rtmr2")]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ImageError(f"{name} of {self.path.name} is malformed") from e
        if owner != digest_hex:
            raise ImageError(f"{name} of {self.path.name} is for another image")
        if any(len(v) != 48 for v in values):
            raise ImageError(f"{name} of {self.path.name} is malformed")
        return TdxMeasurements(*values)
