"""the measured part of a VM configuration: upstream's `vm_config` keys that change MRTD/RTMR0-2.

* `memory_size` (bytes): the TD HOB and the kernel's initrd placement;
* `qemu_version` ("MAJOR.MINOR.PATCH", absent = 9.1.0): QEMU 8.x adds pages in two passes,
  QEMU 9 and later in one, older versions are refused; `qemu_single_pass_add_pages` overrides
  the page-add order and, as upstream reads it, `true` means two passes;
* `ovmf_variant` ("pre202505", the only RTMR0 layout dstack's firmware has);
* `tdx_attestation_variant` ("legacy", the default, or "lite") and `tdx_measurement`
  (`{checksum_file, measurement}`, base64) select how the OS image is checked.

vCPUs, GPUs, NICs and the like only change the ACPI tables, whose digests come from the event
log (this implementation does not rebuild ACPI tables).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pydstack.attest.errors import ParseError
from pydstack.types.netaddr import ascii_decimal

from .tdvf import MAX_ADDRESS, OVMF_VARIANTS

DEFAULT_QEMU = (9, 1, 0)
MAX_CPUS = 4096
MAX_DOCUMENT = 1024 * 1024
LITE, LEGACY = "lite", "legacy"


def qemu_version(value: str | None) -> tuple[int, int, int]:
    """a QEMU version triple; ParseError unless it is "MAJOR.MINOR.PATCH" of 8.0.0 or later."""
    if value is None:
        return DEFAULT_QEMU
    numbers = [ascii_decimal(p, 6) for p in value.split(".")]
    if len(numbers) != 3 or None in numbers:
        raise ParseError(f"qemu_version {value[:32]!r} is not MAJOR.MINOR.PATCH")
    major, minor, patch = (n or 0 for n in numbers)
    if (major, minor, patch) < (8, 0, 0):
        raise ParseError(f"qemu version {value} is not supported (8.0.0 or later)")
    return major, minor, patch


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > MAX_DOCUMENT * 2:
        raise ParseError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ParseError(f"{what} is not valid base64") from e


def _opt_bool(obj: dict[str, Any], key: str) -> bool | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, bool):
        raise ParseError(f"vm_config {key} must be a boolean")
    return value


def _int(obj: dict[str, Any], key: str, hi: int) -> int:
    value = obj.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
        raise ParseError(f"vm_config {key} must be an integer between 0 and {hi}")
    return value


@dataclass(frozen=True, slots=True)
class VmMeasureConfig:
    os_image_hash: bytes
    cpu_count: int
    memory_size: int
    qemu_version: str | None = None
    #: upstream's `qemu_single_pass_add_pages`: when set, it is the two-pass flag
    two_pass_override: bool | None = None
    pic: bool | None = None
    ovmf_variant: str | None = None
    image: str | None = None
    tdx_attestation_variant: str = LEGACY
    #: (checksum_file, measurement) of `tdx_measurement`
    tdx_measurement: tuple[bytes, bytes] | None = None

    @classmethod
    def from_obj(cls, obj: Any) -> VmMeasureConfig:
        """from a decoded vm_config object; ParseError naming the first bad key."""
        if not isinstance(obj, dict):
            raise ParseError("vm_config must be a json object")
        image_hash = obj.get("os_image_hash", "")
        if not isinstance(image_hash, str) or len(image_hash) > 128:
            raise ParseError("vm_config os_image_hash must be a hex string")
        try:
            os_image_hash = bytes.fromhex(image_hash)
        except ValueError as e:
            raise ParseError("vm_config os_image_hash is not valid hex") from e
        version = obj.get("qemu_version")
        if version is not None:
            if not isinstance(version, str):
                raise ParseError("vm_config qemu_version must be a string")
            qemu_version(version)
        variant = obj.get("ovmf_variant")
        if variant is not None and variant not in OVMF_VARIANTS:
            raise ParseError(f"vm_config ovmf_variant {str(variant)[:32]!r} is not supported")
        image = obj.get("image")
        if image is not None and not isinstance(image, str):
            raise ParseError("vm_config image must be a string")
        att_variant = obj.get("tdx_attestation_variant", LEGACY)
        if att_variant not in (LEGACY, LITE):
            raise ParseError("vm_config tdx_attestation_variant must be 'legacy' or 'lite'")
        doc = obj.get("tdx_measurement")
        measurement = None
        if doc is not None:
            if not isinstance(doc, dict):
                raise ParseError("vm_config tdx_measurement must be an object")
            measurement = (
                _b64(doc.get("checksum_file"), "tdx_measurement.checksum_file"),
                _b64(doc.get("measurement"), "tdx_measurement.measurement"),
            )
        return cls(
            os_image_hash=os_image_hash,
            cpu_count=_int(obj, "cpu_count", MAX_CPUS),
            memory_size=_int(obj, "memory_size", MAX_ADDRESS - 1),
            qemu_version=version,
            two_pass_override=_opt_bool(obj, "qemu_single_pass_add_pages"),
            pic=_opt_bool(obj, "pic"),
            ovmf_variant=variant,
            image=image,
            tdx_attestation_variant=att_variant,
            tdx_measurement=measurement,
        )

    def two_pass(self) -> bool:
        """whether QEMU adds all pages of a section before extending them."""
        major, _, _ = qemu_version(self.qemu_version)
        if self.two_pass_override is not None:
            return self.two_pass_override
        return major == 8

    def require_memory(self) -> int:
        if self.memory_size <= 0:
            raise ParseError("vm_config memory_size is missing")
        return self.memory_size

    def measurement_key(self) -> str:
        """what an image's expected measurement depends on, as a stable string."""
        return _measurement_key(
            self.memory_size, self.two_pass(), self.ovmf_variant or OVMF_VARIANTS[0]
        )


@functools.lru_cache(maxsize=256)
def _measurement_key(memory_size: int, two_pass: bool, ovmf_variant: str) -> str:
    key = {"memory_size": memory_size, "two_pass": two_pass, "ovmf_variant": ovmf_variant}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
