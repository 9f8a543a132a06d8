"""lite verification on upstream's tdx-lite fixture (captured on TDX hardware), and the inputs
lite mode must refuse."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from pydstack.attest import cbor
from pydstack.attest.errors import ParseError, VerifyError
from pydstack.attest.eventlog import event_log_from_json
from pydstack.attest.quote import parse_quote
from pydstack.mr.lite import TdxImageMeasurement, lite_measurements
from pydstack.mr.machine import VmMeasureConfig
from pydstack.mr.verify import acpi_digests


@pytest.fixture
def lite(vectors):
    doc = json.loads((vectors / "dstack/verifier_tdx-lite-getquote.json").read_text())
    report = parse_quote(bytes.fromhex(doc["quote"])).td_report
    return json.loads(doc["vm_config"]), event_log_from_json(doc["event_log"]), report


def test_fixture_measurements_equal_the_quote(lite):
    vm_config, events, report = lite
    m = lite_measurements(VmMeasureConfig.from_obj(vm_config), acpi_digests(events))
    assert (m.mrtd, m.rtmr0, m.rtmr1, m.rtmr2) == (
        report.mr_td,
        report.rtmr0,
        report.rtmr1,
        report.rtmr2,
    )


def test_measurement_document_round_trips_byte_for_byte(lite):
    raw = base64.b64decode(lite[0]["tdx_measurement"]["measurement"])
    doc = TdxImageMeasurement.from_cbor(raw)
    assert doc.to_cbor() == raw
    assert doc.td_hob_witness.hex() == "80100904000609020b021010"


def test_qemu_version_picks_the_mrtd_candidate(lite):
    vm_config, events, report = lite
    doc = TdxImageMeasurement.from_cbor(
        base64.b64decode(vm_config["tdx_measurement"]["measurement"])
    )
    assert report.mr_td == doc.mrtd_two_pass  # QEMU 8.2.2 adds pages in two passes
    for change, expect in [
        ({"qemu_version": "9.1.0"}, doc.mrtd_single_pass),
        ({"qemu_single_pass_add_pages": False}, doc.mrtd_single_pass),
        ({"qemu_version": "9.1.0", "qemu_single_pass_add_pages": True}, doc.mrtd_two_pass),
    ]:
        vm = VmMeasureConfig.from_obj({**vm_config, **change})
        assert lite_measurements(vm, acpi_digests(events)).mrtd == expect


def _rebound(vm_config, measurement: bytes) -> dict:
    """vm_config carrying `measurement` with a manifest and os_image_hash that bind it."""
    checksum = f"{hashlib.sha256(measurement).hexdigest()}  measurement.tdx.cbor\n".encode()
    return {
        **vm_config,
        "os_image_hash": hashlib.sha256(checksum).hexdigest(),
        "tdx_measurement": {
            "checksum_file": base64.b64encode(checksum).decode(),
            "measurement": base64.b64encode(measurement).decode(),
        },
    }


def _doc(vm_config) -> dict:
    return cbor.decode(base64.b64decode(vm_config["tdx_measurement"]["measurement"]))


def test_rebinding_keeps_the_fixture_valid(lite):
    vm_config, events, report = lite
    vm = VmMeasureConfig.from_obj(_rebound(vm_config, cbor.encode(_doc(vm_config))))
    assert lite_measurements(vm, acpi_digests(events)).rtmr0 == report.rtmr0


@pytest.mark.parametrize(
    ("change", "error", "reason"),
    [
        (lambda d: d.update(version=2), ParseError, "version 2"),
        (lambda d: d["image"].update(initrd_sha384=b"x" * 47), ParseError, "48-byte"),
        (lambda d: d["tdvf"].update(ovmf="post202505"), ParseError, "ovmf variant"),
        (lambda d: d["tdvf"].update(td_hob=b"\x80" * 5000), ParseError, "4 KiB"),
        (lambda d: d["tdvf"].update(td_hob=bytes.fromhex("801000ff7f")), ParseError, "too short"),
        (lambda d: d.pop("image"), ParseError, "image must be a map"),
    ],
)
def test_bad_documents_are_refused(lite, change, error, reason):
    vm_config, events, _ = lite
    doc = _doc(vm_config)
    change(doc)
    vm = VmMeasureConfig.from_obj(_rebound(vm_config, cbor.encode(doc)))
    with pytest.raises(error, match=reason):
        lite_measurements(vm, acpi_digests(events))


def test_absurd_cbor_sizes_are_refused_before_allocation(lite):
    vm_config, events, _ = lite
    # a byte string claiming 2^62 bytes, a map claiming 2^40 entries
    for raw in (
        bytes([0x5B]) + (1 << 62).to_bytes(8, "big"),
        bytes([0xBB]) + (1 << 40).to_bytes(8, "big"),
    ):
        vm = VmMeasureConfig.from_obj(_rebound(vm_config, raw))
        with pytest.raises(ParseError, match=r"cannot fit|runs past"):
            lite_measurements(vm, acpi_digests(events))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"memory_size": 0xA0000000}, "memory_size of exactly"),
        ({"memory_size": 1 << 30}, "memory_size of exactly"),
        ({"os_image_hash": "00" * 32}, "is not sha256"),
        ({"ovmf_variant": "pre202505", "tdx_measurement": None}, "needs vm_config.tdx_measurement"),
    ],
)
def test_configs_lite_mode_refuses(lite, change, reason):
    vm_config, events, _ = lite
    vm = VmMeasureConfig.from_obj({**vm_config, **change})
    with pytest.raises(VerifyError, match=reason):
        lite_measurements(vm, acpi_digests(events))


def test_a_tampered_document_does_not_match_its_manifest(lite):
    vm_config, events, _ = lite
    doc = _doc(vm_config)
    doc["image"]["initrd_sha384"] = bytes(48)
    tampered = {
        **vm_config["tdx_measurement"],
        "measurement": base64.b64encode(cbor.encode(doc)).decode(),
    }
    vm = VmMeasureConfig.from_obj({**vm_config, "tdx_measurement": tampered})
    with pytest.raises(VerifyError, match=r"does not match its sha256sum\.txt entry"):
        lite_measurements(vm, acpi_digests(events))


def test_missing_or_unnamed_acpi_digests_are_refused(lite):
    _, events, _ = lite
    without = [e for e in events if e.event != "acpi-rsdp"]
    with pytest.raises(VerifyError, match="exactly 3"):
        acpi_digests(without)
    renamed = [
        e if e.event != "acpi-rsdp" else type(e)(e.imr, e.event_type, e.digest, "", e.event_payload)
        for e in events
    ]
    with pytest.raises(VerifyError, match="named acpi-rsdp"):
        acpi_digests(renamed)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"qemu_version": "7.2.0"}, "not supported"),
        ({"qemu_version": "8.2"}, "MAJOR.MINOR.PATCH"),
        ({"memory_size": -1}, "memory_size"),
        ({"tdx_attestation_variant": "full"}, "legacy' or 'lite"),
        ({"os_image_hash": "zz"}, "not valid hex"),
        ({"tdx_measurement": {"checksum_file": "!!", "measurement": ""}}, "base64"),
        ({"pic": "yes"}, "boolean"),
    ],
)
def test_vm_config_values_are_checked(lite, change, reason):
    with pytest.raises(ParseError, match=reason):
        VmMeasureConfig.from_obj({**lite[0], **change})
