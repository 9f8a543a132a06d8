"""the shared verification core: each check reported on its own, the request forms, bad input."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydstack.attest.attestation import Attestation, encode_v0
from pydstack.attest.eventlog import RuntimeEvent, event_log_to_json
from pydstack.attest.evidence import EvidenceVerifier
from pydstack.attest.verify import CollateralCache
from pydstack.mr.store import ImageStore
from pydstack.mr.verify import OsImageVerifier
from pydstack.tee.simulated import SimulatedTdx
from pydstack.vmm.backends.sandbox.image import ensure_sandbox_image, sandbox_image_digest

SEED = bytes.fromhex("3c" * 32)
DIGEST = sandbox_image_digest()
VM_CONFIG = json.dumps({"os_image_hash": DIGEST, "cpu_count": 1, "memory_size": 1 << 30})
KP = b'{"name":"kms","id":"3059"}'


def attestation(os_image: str = DIGEST, *, config: str = VM_CONFIG) -> Attestation:
    tdx = SimulatedTdx(SEED, os_image=os_image)
    for ev in (
        RuntimeEvent("app-id", b"\x04" * 20),
        RuntimeEvent("compose-hash", b"\x05" * 32),
        RuntimeEvent("instance-id", b"\x06" * 20),
        RuntimeEvent("boot-mr-done", b""),
        RuntimeEvent("key-provider", KP),
        RuntimeEvent("system-ready", b""),
    ):
        tdx.extend_rtmr3(ev)
    rd = hashlib.sha512(b"challenge").digest()
    return Attestation(
        tdx.get_quote(rd), tuple(tdx.event_log()), tuple(tdx.runtime_events()), rd, config
    )


def _verifier(images_dir):
    ensure_sandbox_image(images_dir)
    tdx = SimulatedTdx(SEED)
    cache = CollateralCache(None)
    cache.put(tdx.pki.platform.fmspc.hex(), tdx.collateral_json())
    images = OsImageVerifier(ImageStore(images_dir))
    return EvidenceVerifier(cache, root_ca_der=tdx.root_ca_der, images=images)


@pytest.fixture
def verifier(tmp_path):
    return _verifier(tmp_path)


async def test_genuine_evidence_is_valid(verifier):
    v = await verifier.verify(attestation())
    assert v.is_valid and v.reason is None
    assert v.app_info is not None and v.app_info.os_image_hash.hex() == DIGEST
    out = v.to_json_obj()
    d = out["details"]
    assert (d["quote_verified"], d["event_log_verified"], d["os_image_hash_verified"]) == (
        True,
        True,
        True,
    )
    assert d["acpi_tables_verified"] is False
    assert d["tcb_status"] == "UpToDate" and d["tee_variant"] == "dstack-tdx"
    assert d["key_provider"] == {"name": "kms", "id": "3059"}
    assert d["app_info"]["app_id"] == "04" * 20 and d["app_info"]["os_image_hash"] == DIGEST
    assert d["os_image_is_dev"] is True
    assert d["boot_info"]["osImageHash"] == DIGEST and d["boot_info"]["tcbStatus"] == "UpToDate"


async def test_a_quote_without_collateral_still_gets_its_other_checks(verifier):
    offline = EvidenceVerifier(
        CollateralCache(None), root_ca_der=verifier.root_ca_der, images=verifier.images
    )
    v = await offline.verify(attestation())
    assert (v.quote_verified, v.event_log_verified, v.os_image_hash_verified) == (False, True, True)
    assert not v.is_valid and v.reason.startswith("quote: no collateral for fmspc")
    assert "boot_info" not in v.to_json_obj()["details"]


async def test_an_image_mismatch_names_the_registers(verifier):
    v = await verifier.verify(attestation("an-image-it-does-not-claim"))
    assert (v.quote_verified, v.event_log_verified, v.os_image_hash_verified) == (True, True, False)
    assert "os image: the quote does not match the os image: mrtd (expected" in v.reason
    assert "rtmr1" in v.reason


async def test_an_rtmr3_mismatch_fails_the_event_log_only(verifier):
    att = attestation()
    att = dataclasses.replace(att, runtime_events=att.runtime_events[:-1])
    v = await verifier.verify(att)
    assert (v.quote_verified, v.event_log_verified, v.os_image_hash_verified) == (True, False, True)
    assert (
        v.reason
        == "event log: rtmr3 replay mismatch: the runtime event log does not match the quote"
    )


async def test_an_unknown_image_fails_the_os_image_only(verifier):
    other = json.dumps({"os_image_hash": "ab" * 32, "memory_size": 1 << 30})
    v = await verifier.verify(attestation(config=other))
    assert (v.quote_verified, v.event_log_verified, v.os_image_hash_verified) == (True, True, False)
    assert "not in the image cache" in v.reason


async def test_fail_fast_and_skipping_the_image(verifier):
    offline = EvidenceVerifier(CollateralCache(None), images=verifier.images)
    v = await offline.verify(attestation(), fail_fast=True)
    assert len(v.failures) == 1 and not v.event_log_verified
    v = await verifier.verify(attestation("elsewhere"), check_image=False)
    assert v.is_valid and not v.os_image_hash_verified
    bare = EvidenceVerifier(verifier.collateral, root_ca_der=verifier.root_ca_der)
    v = await bare.verify(attestation())
    assert v.reason == "os image: os image verification is not configured"


async def test_both_request_forms(verifier):
    att = attestation()
    v = await verifier.verify_request({"attestation": encode_v0(att).hex()})
    assert v.is_valid, v.reason
    raw = {
        "quote": att.quote.hex(),
        "event_log": event_log_to_json(att.event_log),
        "vm_config": VM_CONFIG,
        "report_data": att.report_data.hex(),
    }
    v = await verifier.verify_request(raw)
    assert v.is_valid, v.reason
    # with an attestation, the top-level fields are ignored
    v = await verifier.verify_request({"attestation": encode_v0(att).hex(), "quote": "00"})
    assert v.is_valid


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([], "must be a json object"),
        ({}, "needs attestation"),
        ({"attestation": "0x00"}, "not valid hex"),
        ({"attestation": "zz"}, "not valid hex"),
        ({"attestation": "00" * (11 << 20)}, "larger than"),
        ({"quote": "00" * 70000, "event_log": "[]"}, "larger than"),
        ({"quote": "0400", "event_log": 5}, "event_log must be"),
        ({"quote": "0400", "event_log": "[]", "vm_config": {}}, "vm_config must be"),
        ({"quote": "0400", "event_log": "[{"}, "not valid json"),
    ],
)
async def test_bad_requests_give_a_reason(verifier, body, reason):
    v = await verifier.verify_request(body)
    assert not v.is_valid and reason in v.reason
    assert v.to_json_obj()["details"]["quote_verified"] is False


async def test_truncated_attestations_are_refused(verifier):
    raw = encode_v0(attestation())
    for cut in (1, 10, 100, len(raw) // 2, len(raw) - 1):
        v = await verifier.verify_request({"attestation": raw[:cut].hex()})
        assert not v.is_valid and v.reason.startswith("request:")
    quote = attestation().quote
    v = await verifier.verify_request({"quote": quote[:600].hex(), "event_log": "[]"})
    assert not v.is_valid and "quote truncated" in v.reason


async def test_lite_fixture_without_collateral(vectors):
    """upstream's tdx-lite capture: event log and os image verify offline; DCAP needs
    collateral this repository does not have, and is reported as such."""
    verifier = EvidenceVerifier(CollateralCache(None), images=OsImageVerifier())
    for name in ("verifier_tdx-lite-getquote.json", "verifier_tdx-lite-attestation.json"):
        body = json.loads((vectors / "dstack" / name).read_text())
        v = await verifier.verify_request(body)
        assert (v.quote_verified, v.event_log_verified, v.os_image_hash_verified) == (
            False,
            True,
            True,
        ), v.reason
        assert v.reason == "quote: no collateral for fmspc 90C06F000000 and no pccs url configured"
        d = v.to_json_obj()["details"]
        assert d["app_info"]["os_image_hash"].startswith("e6f5cfec")
        assert d["app_info"]["mr_system"].startswith("118f754a")
        assert d["app_info"]["mr_aggregated"].startswith("c758fa62")
        assert d["acpi_tables_verified"] is False


async def test_a_forged_quote_fails_even_with_collateral_cached(verifier):
    """a cached fmspc skips the precheck; dcap-qvl then refuses the forgery itself."""
    att = attestation()
    forged = bytearray(att.quote)
    forged[200] ^= 1  # body changed after signing
    v = await verifier.verify(dataclasses.replace(att, quote=bytes(forged)))
    assert not v.quote_verified and v.reason.startswith("quote: quote verification failed")


_TEXT = st.text(max_size=12)  # any code point: quotes, controls, non-ascii, lone surrogates


@settings(max_examples=300, deadline=None)
@given(
    flags=st.tuples(*[st.booleans()] * 4),
    optional=st.tuples(st.none() | st.booleans(), st.none() | _TEXT, st.none() | _TEXT),
    status=st.none() | _TEXT,
    advisories=st.lists(_TEXT, max_size=3),
    failures=st.lists(st.tuples(_TEXT, _TEXT), max_size=2),
    kp_name=st.none() | _TEXT,
    scripts=st.none() | st.lists(st.binary(max_size=4), min_size=1, max_size=2),
    with_app=st.booleans(),
    with_report=st.booleans(),
)
def test_the_json_answer_is_written_as_json_dumps_writes_it(
    genuine, flags, optional, status, advisories, failures, kp_name, scripts, with_app, with_report
):
    v = dataclasses.replace(genuine, failures=list(failures))
    v.quote_verified, v.event_log_verified, v.os_image_hash_verified = flags[:3]
    v.acpi_tables_verified = flags[3]
    v.os_image_is_dev, v.os_image_version, v.tee_variant = optional
    v.tcb_status, v.advisory_ids = status, tuple(advisories)
    if v.app_info is not None:
        kp = b"" if kp_name is None else json.dumps({"name": kp_name, "id": "i\u00e9"}).encode()
        v.app_info = dataclasses.replace(
            v.app_info, key_provider_info=kp, init_script_hashes=scripts and tuple(scripts)
        )
    v.app_info = v.app_info if with_app else None
    v.report = v.report if with_report else None
    if not with_report:
        v.report_data = None
    assert v.to_json_bytes() == json.dumps(v.to_json_obj()).encode()


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    verifier = _verifier(tmp_path_factory.mktemp("images"))
    v = asyncio.run(verifier.verify(attestation()))
    assert v.is_valid and v.to_json_bytes() == json.dumps(v.to_json_obj()).encode()
    return v


async def test_a_raw_form_request_parses_its_quote_once(verifier, monkeypatch):
    import pydstack.attest.attestation as attestation_module
    import pydstack.attest.evidence as evidence_module
    from pydstack.attest.quote import parse_quote

    calls = []

    def counted(data):
        calls.append(len(data))
        return parse_quote(data)

    for module in (evidence_module, attestation_module):
        monkeypatch.setattr(module, "parse_quote", counted)
    att = attestation()
    raw = {"quote": att.quote.hex(), "event_log": event_log_to_json(att.event_log)}
    v = await verifier.verify_request({**raw, "vm_config": VM_CONFIG})
    assert v.is_valid and calls == [len(att.quote)]


async def test_a_parse_of_other_bytes_is_not_taken_for_the_quote(verifier):
    from pydstack.attest.attestation import from_quote_and_event_log
    from pydstack.attest.quote import parse_quote

    att = attestation()
    other_quote = SimulatedTdx(SEED).get_quote(hashlib.sha512(b"other").digest())
    made = from_quote_and_event_log(att.quote, att.event_log, VM_CONFIG, parse_quote(other_quote))
    assert made.report_data == att.report_data != hashlib.sha512(b"other").digest()
    v = await verifier._verify(att, parse_quote(other_quote))
    assert v.is_valid and v.report is not None
    assert v.report.report_data == att.report_data
