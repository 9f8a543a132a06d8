"""ra-tls certificates: extensions round trip, the key binding is enforced."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pydstack.attest.attestation import Attestation, to_versioned_bytes
from pydstack.attest.errors import ParseError, VerifyError
from pydstack.attest.eventlog import RuntimeEvent
from pydstack.attest.ratls import (
    OID_ATTESTATION,
    get_extension_bytes,
    parse_ratls_cert,
    unwrap_extension_value,
    verify_cert_binding,
    wrap_extension_value,
)
from pydstack.attest.report_data import ratls_report_data
from pydstack.attest.verify import verify_quote
from pydstack.crypto.certs import CertRequest, generate_p256_key, issue_cert, spki_der
from pydstack.tee.simulated import SimulatedTdx


@pytest.fixture(scope="module")
def tdx() -> SimulatedTdx:
    t = SimulatedTdx(bytes.fromhex("33" * 32))
    t.extend_rtmr3(RuntimeEvent("app-id", b"\x05" * 20))
    return t


def _attestation(tdx: SimulatedTdx, report_data: bytes) -> bytes:
    att = Attestation(
        quote=tdx.get_quote(report_data),
        event_log=tuple(tdx.event_log()),
        runtime_events=tuple(tdx.runtime_events()),
        report_data=report_data,
        config="{}",
    )
    return to_versioned_bytes(att)


def test_roundtrip_and_binding(tdx: SimulatedTdx) -> None:
    ca_key = generate_p256_key()
    ca = issue_cert(
        CertRequest("Test CA", org_name="Dstack", ca_level=0), ca_key.public_key(), ca_key
    )
    key = generate_p256_key()
    rd = ratls_report_data(spki_der(key.public_key()))
    cert = issue_cert(
        CertRequest(
            "app.example",
            alt_names=("app.example", "10.0.0.1"),
            usage_server_auth=True,
            app_id=b"\x05" * 20,
            special_usage="app:custom",
            attestation=_attestation(tdx, rd),
        ),
        key.public_key(),
        ca_key,
        ca,
    )
    cert = x509.load_der_x509_certificate(cert.public_bytes(serialization.Encoding.DER))
    info = parse_ratls_cert(cert)
    assert info.app_id == b"\x05" * 20 and info.special_usage == "app:custom"
    att = verify_cert_binding(cert)
    assert att.report_data == rd
    assert (
        verify_quote(att.quote, tdx.collateral_json(), root_ca_der=tdx.root_ca_der).status
        == "UpToDate"
    )
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress)[0].exploded == "10.0.0.1"
    assert cert.issuer == ca.subject


def test_unbound_certificate_refused(tdx: SimulatedTdx) -> None:
    key, other = generate_p256_key(), generate_p256_key()
    wrong = ratls_report_data(spki_der(other.public_key()))
    cert = issue_cert(CertRequest("x", attestation=_attestation(tdx, wrong)), key.public_key(), key)
    with pytest.raises(VerifyError, match="not bound to its quote"):
        verify_cert_binding(cert)
    # attestation claims the right report data but the quote was made for another key
    right = ratls_report_data(spki_der(key.public_key()))
    att = Attestation(tdx.get_quote(wrong), (), (), right, "")
    forged = issue_cert(
        CertRequest("x", attestation=to_versioned_bytes(att)), key.public_key(), key
    )
    with pytest.raises(VerifyError, match="quote report_data"):
        verify_cert_binding(forged)
    plain = issue_cert(CertRequest("plain"), key.public_key(), key)
    with pytest.raises(VerifyError, match="no attestation"):
        verify_cert_binding(plain)


def test_extension_wrapping_bounds() -> None:
    assert unwrap_extension_value(wrap_extension_value(b"x" * 300)) == b"x" * 300
    for bad in (b"", b"\x05\x01a", b"\x04\x05ab", b"\x04\x85\x00\x00\x00\x00\x01a"):
        with pytest.raises(ParseError):
            unwrap_extension_value(bad)
    key = generate_p256_key()
    cert = issue_cert(CertRequest("x", attestation=b"\x07garbage"), key.public_key(), key)
    assert get_extension_bytes(cert, OID_ATTESTATION) == b"\x07garbage"
    with pytest.raises(ParseError):
        verify_cert_binding(cert)
