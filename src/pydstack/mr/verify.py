"""the OS-image check of the shared verification core (:class:`OsImageChecker`).

Selected by `vm_config.tdx_attestation_variant`:

* `lite` — from `vm_config.tdx_measurement` and the event log's three named ACPI digests,
  without the image (:mod:`.lite`); ACPI table contents are not verified;
* `legacy` (the default) — the image named by `os_image_hash` from the :class:`ImageStore`
  (cache directory or download): a TDX image is measured with dstack-mr for the VM's memory and
  QEMU version, RTMR0 with the event log's ACPI digests; a sandbox image, or a qemu development
  image shipping `measurement.simulated.json`, gives the measurement the simulated TD has.
  What an image measures is kept in memory by image and configuration (bounded; the store also
  keeps tdx measurements on disk), so an image is read once.

The expected MRTD and RTMR0-2 must equal the quote's; a mismatch names every register that
differs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from pydstack.attest.errors import ParseError, VerifyError
from pydstack.attest.eventlog import ACPI_DATA, ACPI_LABELS, EV_PLATFORM_CONFIG_FLAGS, TdxEvent
from pydstack.attest.evidence import OsImageResult, TdRegisters

from .image import SANDBOX_KIND, SIMULATED_KIND, PartialMeasurements
from .lite import TdxMeasurements, lite_measurements
from .machine import LITE, VmMeasureConfig
from .store import ImageStore
from .tdvf import AcpiDigests

KNOWN_ENTRIES = 256
_Expected = TdxMeasurements | PartialMeasurements


def acpi_digests(event_log: Sequence[TdxEvent]) -> AcpiDigests:
    """the RTMR0 `ACPI DATA` digests, by name (acpi-loader, acpi-rsdp, acpi-tables); VerifyError
    unless there are exactly three such events, one of each name, with 48-byte digests."""
    events = [
        e
        for e in event_log
        if e.imr == 0 and e.event_type == EV_PLATFORM_CONFIG_FLAGS and e.event_payload == ACPI_DATA
    ]
    if len(events) != 3:
        raise VerifyError(
            f"the event log must hold exactly 3 rtmr0 ACPI DATA events, it holds {len(events)}"
        )
    digests = []
    for name in ACPI_LABELS:
        named = [e.digest for e in events if e.event == name]
        if len(named) != 1:
            raise VerifyError(f"the event log has no single rtmr0 ACPI DATA event named {name}")
        if len(named[0]) != 48:
            raise VerifyError(f"the event log's {name} digest is not 48 bytes")
        digests.append(named[0])
    return AcpiDigests(*digests)


def compare(expected: TdxMeasurements, registers: TdRegisters) -> None:
    """VerifyError naming each register whose quoted value is not the expected one."""
    mismatched = [
        f"{name} (expected {want.hex()}, quote has {got.hex()})"
        for name, want, got in (
            ("mrtd", expected.mrtd, registers.mrtd),
            ("rtmr0", expected.rtmr0, registers.rtmr0),
            ("rtmr1", expected.rtmr1, registers.rtmr1),
            ("rtmr2", expected.rtmr2, registers.rtmr2),
        )
        if want != got
    ]
    if mismatched:
        raise VerifyError("the quote does not match the os image: " + "; ".join(mismatched))


class OsImageVerifier:
    """`store`: where legacy-mode images come from; without one only lite mode verifies."""

    def __init__(self, store: ImageStore | None = None) -> None:
        self.store = store
        #: expected measurements (RTMR0 without ACPI for tdx images) by image and vm config
        self._known: OrderedDict[tuple[bytes, str], tuple[_Expected, OsImageResult]] = OrderedDict()

    async def _image(self, vm: VmMeasureConfig) -> tuple[_Expected, OsImageResult]:
        key = (vm.os_image_hash, vm.measurement_key())
        hit = self._known.get(key)
        if hit is not None:
            self._known.move_to_end(key)
            return hit
        if self.store is None:
            raise VerifyError(
                f"os image {vm.os_image_hash.hex()} needs an image cache (legacy verification)"
            )
        image = await self.store.get(vm.os_image_hash)
        info = OsImageResult(is_dev=image.is_dev, version=image.version)
        expected: _Expected
        if image.kind in (SANDBOX_KIND, SIMULATED_KIND):
            expected = image.sandbox_measurements()
        else:
            expected = await self.store.partial(image, vm)
        self._known[key] = (expected, info)
        while len(self._known) > KNOWN_ENTRIES:
            self._known.popitem(last=False)
        return expected, info

    async def expected(
        self, vm: VmMeasureConfig, event_log: Sequence[TdxEvent]
    ) -> tuple[TdxMeasurements, OsImageResult]:
        """the registers a CVM of `vm` must have, and what is known about its image."""
        if len(vm.os_image_hash) != 32:
            raise VerifyError("vm_config os_image_hash must be 32 bytes")
        if vm.tdx_attestation_variant == LITE:
            return lite_measurements(vm, acpi_digests(event_log)), OsImageResult()
        expected, info = await self._image(vm)
        if isinstance(expected, PartialMeasurements):
            return expected.complete(acpi_digests(event_log)), info
        return expected, info

    async def check_os_image(
        self, vm_config: dict[str, Any], registers: TdRegisters, event_log: Sequence[TdxEvent]
    ) -> OsImageResult:
        try:
            vm = VmMeasureConfig.from_obj(vm_config)
            expected, info = await self.expected(vm, event_log)
        except ParseError as e:
            raise VerifyError(f"cannot compute the os image measurement: {e}") from e
        compare(expected, registers)
        return info
