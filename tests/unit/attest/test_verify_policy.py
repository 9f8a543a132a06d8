"""verification policy over dcap-qvl: real quotes and simulated ones."""

from __future__ import annotations

import datetime as dt
import json
import time

import dcap_qvl
import pytest

from pydstack.attest.errors import VerifyError
from pydstack.attest.verify import CollateralCache, VerificationPolicy, verify_quote
from pydstack.tee.collateral import TcbPolicy
from pydstack.tee.simulated import SimulatedTdx

SEED = bytes.fromhex("71" * 32)


def _now_for(collateral: dict) -> int:
    issue = json.loads(collateral["tcb_info"])["issueDate"]
    return int(dt.datetime.fromisoformat(issue.replace("Z", "+00:00")).timestamp()) + 3600


@pytest.fixture(scope="module")
def real(vectors):
    quote = (vectors / "dcap-qvl/tdx_quote").read_bytes()
    col = json.loads((vectors / "dcap-qvl/tdx_quote_collateral.json").read_text())
    return quote, col, _now_for(col)


def test_real_quote_verifies_uptodate(real):
    quote, col, now = real
    v = verify_quote(quote, col, now=now)
    assert v.status == "UpToDate"
    assert v.advisory_ids == ()
    assert len(v.ppid) == 16
    assert v.fmspc.upper() == "B0C06F000000"


def test_outdated_v5_quote_refused_naming_its_status(vectors):
    quote = (vectors / "dcap-qvl/tdx_quote_outdated").read_bytes()
    col = json.loads((vectors / "dcap-qvl/tdx_quote_outdated_collateral.json").read_text())
    with pytest.raises(VerifyError, match="tcb status TcbNotSupported is not allowed"):
        verify_quote(quote, col, now=_now_for(col))
    # the refusal is the tcb level, not a signature: a flipped signature byte says so instead
    flipped = bytearray(quote)
    flipped[48 + 6 + 648 + 4 + 10] ^= 1
    with pytest.raises(VerifyError, match="signature"):
        verify_quote(bytes(flipped), col, now=_now_for(col))


def test_flipped_signature_byte_refused(real):
    quote, col, now = real
    bad = bytearray(quote)
    bad[632 + 4 + 5] ^= 0x01  # inside the ecdsa signature
    with pytest.raises(VerifyError, match="signature is invalid"):
        verify_quote(bytes(bad), col, now=now)


def test_tampered_report_data_refused(real):
    quote, col, now = real
    bad = bytearray(quote)
    bad[568] ^= 0x01
    with pytest.raises(VerifyError):
        verify_quote(bytes(bad), col, now=now)


def test_collateral_window_and_age(real):
    quote, col, now = real
    with pytest.raises(VerifyError, match="future"):
        verify_quote(quote, col, now=now - 2 * 86400)
    with pytest.raises(VerifyError, match="collateral too old"):
        verify_quote(quote, col, now=now, policy=VerificationPolicy(max_collateral_age_seconds=60))
    assert (
        verify_quote(
            quote, col, now=now, policy=VerificationPolicy(max_collateral_age_seconds=7200)
        ).status
        == "UpToDate"
    )


def test_simulated_quote_needs_the_mock_root():
    tdx = SimulatedTdx(SEED)
    quote = tdx.get_quote(b"report")
    col = tdx.collateral_json()
    v = verify_quote(quote, col, root_ca_der=tdx.root_ca_der)
    assert v.status == "UpToDate"
    assert v.quote.report_data == b"report".ljust(64, b"\0")
    with pytest.raises(VerifyError):
        verify_quote(quote, col)  # Intel's root
    other = SimulatedTdx(bytes(32))
    with pytest.raises(VerifyError):
        verify_quote(quote, col, root_ca_der=other.root_ca_der)
    with pytest.raises(VerifyError):
        verify_quote(quote, other.collateral_json(), root_ca_der=other.root_ca_der)
    # raw dcap-qvl agrees
    report = dcap_qvl.verify_with_root_ca(
        quote, dcap_qvl.QuoteCollateralV3.from_json(col), tdx.root_ca_der, int(time.time())
    )
    assert report.status == "UpToDate"


def test_outofdate_policy_and_advisories():
    tdx = SimulatedTdx(
        SEED, tcb_policy=TcbPolicy("OutOfDate", ("INTEL-SA-00001", "INTEL-SA-00002"))
    )
    quote, col = tdx.get_quote(b""), tdx.collateral_json()
    with pytest.raises(VerifyError, match=r"tcb status OutOfDate is not allowed.*INTEL-SA-00001"):
        verify_quote(quote, col, root_ca_der=tdx.root_ca_der)
    lax = VerificationPolicy(allowed_tcb_statuses=frozenset({"UpToDate", "OutOfDate"}))
    v = verify_quote(quote, col, root_ca_der=tdx.root_ca_der, policy=lax)
    assert v.status == "OutOfDate" and set(v.advisory_ids) == {"INTEL-SA-00001", "INTEL-SA-00002"}
    named = VerificationPolicy(
        allowed_tcb_statuses=frozenset({"OutOfDate"}),
        allowed_advisory_ids=frozenset({"INTEL-SA-00001"}),
    )
    with pytest.raises(VerifyError, match="advisories not allowed: INTEL-SA-00002"):
        verify_quote(quote, col, root_ca_der=tdx.root_ca_der, policy=named)


def test_debug_td_refused():
    tdx = SimulatedTdx(SEED, debug=True)
    # our own check, named as ours (dcap-qvl's would say "debug mode is enabled")
    with pytest.raises(VerifyError, match=r"^debug td refused$"):
        verify_quote(tdx.get_quote(b""), tdx.collateral_json(), root_ca_der=tdx.root_ca_der)


def test_malformed_inputs():
    with pytest.raises(VerifyError, match="malformed quote"):
        verify_quote(b"\x04\x00" * 10, "{}")
    tdx = SimulatedTdx(SEED)
    with pytest.raises(VerifyError, match="invalid collateral"):
        verify_quote(tdx.get_quote(b""), "{not json", root_ca_der=tdx.root_ca_der)


async def test_collateral_cache_uses_disk_and_refuses_without_source(tmp_path):
    tdx = SimulatedTdx(SEED)
    quote = tdx.get_quote(b"")
    cache = CollateralCache(None, tmp_path)
    with pytest.raises(VerifyError, match="no pccs url"):
        await cache.get(quote, root_ca_der=tdx.root_ca_der)
    cache.put(tdx.pki.platform.fmspc.hex(), tdx.collateral_json())
    again = CollateralCache(None, tmp_path)
    text = await again.get(quote, root_ca_der=tdx.root_ca_der)
    assert verify_quote(quote, text, root_ca_der=tdx.root_ca_der).status == "UpToDate"
