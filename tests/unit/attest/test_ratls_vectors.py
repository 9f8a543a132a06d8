"""ra-tls certificates carrying upstream's simulator attestation: read back, binding refused or
accepted, legacy quote + event-log extensions, compressed values, malformed extensions."""

from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.attest.attestation import Attestation, decode_versioned, encode_v0, stripped
from pydstack.attest.errors import ParseError, VerifyError
from pydstack.attest.eventlog import event_log_to_json
from pydstack.attest.quote import parse_quote
from pydstack.attest.ratls import (
    MAX_EXTENSION_SIZE,
    OID_APP_ID,
    OID_ATTESTATION,
    OID_EVENT_LOG,
    OID_TDX_QUOTE,
    cert_attestation,
    compress_ext_value,
    decompress_ext_value,
    get_extension_bytes,
    parse_ratls_cert,
    verify_cert_binding,
    wrap_extension_value,
)
from pydstack.attest.report_data import ratls_report_data
from pydstack.crypto.certs import CertRequest, generate_p256_key, issue_cert, spki_der

APP_ID = bytes.fromhex("5bb4ff9a3837357f19dc176407a5709c62eb6c56")
REPORT_DATA_AT = slice(568, 632)  # TDX quote v4: 48-byte header + report_data at body offset 520


@pytest.fixture(scope="module")
def sim_att(vectors: Path) -> Attestation:
    return decode_versioned((vectors / "dstack/simulator_attestation.bin").read_bytes())


def _with_quote_report_data(att: Attestation, report_data: bytes) -> Attestation:
    quote = att.quote[: REPORT_DATA_AT.start] + report_data + att.quote[REPORT_DATA_AT.stop :]
    return dataclasses.replace(att, quote=quote)


def _cert_with(
    extensions: dict[x509.ObjectIdentifier, bytes], key: ec.EllipticCurvePrivateKey | None = None
) -> x509.Certificate:
    """a self-signed certificate with raw extnValues, as a legacy or hostile issuer writes."""
    key = key or generate_p256_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2034, 1, 1, tzinfo=dt.UTC))
    )
    for oid, value in extensions.items():
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
    return builder.sign(key, hashes.SHA256())


def test_v0_attestation_read_back_and_binding_checks(sim_att: Attestation) -> None:
    key, other = generate_p256_key(), generate_p256_key()
    rd = ratls_report_data(spki_der(key.public_key()))
    # report_data bound to the key, as the guest's Attest would set it; the quote is the vector's
    att = stripped(dataclasses.replace(sim_att, report_data=rd))
    raw = encode_v0(att)
    cert = issue_cert(
        CertRequest("app", app_id=APP_ID, special_usage="app:custom", attestation=raw),
        key.public_key(),
        key,
    )
    cert = x509.load_der_x509_certificate(cert.public_bytes(serialization.Encoding.DER))
    info = parse_ratls_cert(cert)
    assert info.attestation == raw and info.app_id == APP_ID
    assert info.legacy_quote is None and info.legacy_event_log is None
    back = cert_attestation(cert)
    assert back == att
    assert back is not None and back.quote == sim_att.quote
    assert len(back.event_log) == 12 and len(back.runtime_events) == 9
    # failure mode 1: the attestation claims the key but its quote was made for other data
    assert parse_quote(sim_att.quote).report_data != rd
    with pytest.raises(VerifyError, match="not bound to its quote: quote report_data"):
        verify_cert_binding(cert)
    # the same attestation with a quote carrying the binding is accepted (DCAP is separate)
    bound = _with_quote_report_data(att, rd)
    good = issue_cert(CertRequest("app", attestation=encode_v0(bound)), key.public_key(), key)
    checked = verify_cert_binding(good)
    assert checked.report_data == rd and parse_quote(checked.quote).report_data == rd
    # failure mode 2: attestation and quote both bind another key
    rd_other = ratls_report_data(spki_der(other.public_key()))
    foreign = encode_v0(_with_quote_report_data(att.with_report_data(rd_other), rd_other))
    wrong = issue_cert(CertRequest("app", attestation=foreign), key.public_key(), key)
    with pytest.raises(VerifyError, match="not bound to its quote: attestation report_data"):
        verify_cert_binding(wrong)
    # ... which is fine on a certificate for that other key
    assert (
        verify_cert_binding(
            issue_cert(CertRequest("app", attestation=foreign), other.public_key(), other)
        ).report_data
        == rd_other
    )


def test_legacy_quote_and_event_log_extensions(sim_att: Attestation) -> None:
    key = generate_p256_key()
    rd = ratls_report_data(spki_der(key.public_key()))
    quote = _with_quote_report_data(sim_att, rd).quote
    log = event_log_to_json(sim_att.event_log).encode()
    for log_value in (log, compress_ext_value(log)):
        cert = _cert_with(
            {
                OID_TDX_QUOTE: wrap_extension_value(quote),
                OID_EVENT_LOG: wrap_extension_value(log_value),
            },
            key,
        )
        info = parse_ratls_cert(cert)
        assert info.attestation is None and info.legacy_quote == quote
        assert info.legacy_event_log == log
        att = verify_cert_binding(cert)
        # a V0 attestation from the quote: report_data from the quote, runtime events from
        # the log, no config
        assert att.report_data == rd and att.config == ""
        assert att.runtime_events == sim_att.runtime_events
        assert att.event_log == sim_att.event_log
    # the quote without its event log is refused
    lone = _cert_with({OID_TDX_QUOTE: wrap_extension_value(quote)}, key)
    with pytest.raises(ParseError, match="no event log"):
        cert_attestation(lone)
    # .8 wins over the legacy pair (upstream's reading order)
    other_rd = ratls_report_data(b"something else")
    both = _cert_with(
        {
            OID_TDX_QUOTE: wrap_extension_value(quote),
            OID_EVENT_LOG: wrap_extension_value(log),
            OID_ATTESTATION: wrap_extension_value(encode_v0(sim_att.with_report_data(other_rd))),
        },
        key,
    )
    got = cert_attestation(both)
    assert got is not None and got.report_data == other_rd
    with pytest.raises(VerifyError, match="attestation report_data"):
        verify_cert_binding(both)


def test_compressed_extension_values() -> None:
    data = b'{"imr":3,"event":"x"}' * 100
    packed = compress_ext_value(data)
    assert packed.startswith(b"ELGZv1") and len(packed) < len(data) // 4
    assert decompress_ext_value(packed) == data
    assert decompress_ext_value(data) == data  # uncompressed values pass through
    at_cap = b"a" * 16 * 1024
    assert decompress_ext_value(compress_ext_value(at_cap)) == at_cap
    with pytest.raises(ParseError, match="16 KiB"):
        decompress_ext_value(compress_ext_value(at_cap + b"a"))
    bomb = b"ELGZv1" + gzip.compress(bytes(64 * 1024 * 1024))
    with pytest.raises(ParseError, match="16 KiB"):
        decompress_ext_value(bomb)
    for corrupt in (b"ELGZv1", b"ELGZv1not gzip", packed[:-12], packed[:20] + b"\xff" * 20):
        with pytest.raises(ParseError, match="corrupt"):
            decompress_ext_value(corrupt)


def test_malformed_extensions_are_parse_errors() -> None:
    for raw in (
        b"\x05\x00",  # NULL, not an OCTET STRING
        b"\x04\x03ab",  # short
        b"\x04\x01ab",  # trailing byte
        b"\x04\x81\x02ab",  # long form for a short length
        b"\x04\x82\x00\x02ab",  # leading zero in the length
        b"\x04\x80",  # indefinite length
    ):
        cert = _cert_with({OID_APP_ID: raw})
        with pytest.raises(ParseError):
            get_extension_bytes(cert, OID_APP_ID)
        with pytest.raises(ParseError):
            parse_ratls_cert(cert)
    cert = _cert_with({OID_APP_ID: wrap_extension_value(b"x" * 300)})
    assert get_extension_bytes(cert, OID_APP_ID) == b"x" * 300
    assert get_extension_bytes(cert, OID_ATTESTATION) is None
    huge = _cert_with({OID_ATTESTATION: wrap_extension_value(b"\x00" * MAX_EXTENSION_SIZE)})
    with pytest.raises(ParseError, match="too large"):
        get_extension_bytes(huge, OID_ATTESTATION)
    key = generate_p256_key()
    plain = issue_cert(CertRequest("x"), key.public_key(), key)
    bad_usage = _cert_with({x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.4"): b"\x04\x01\xff"})
    with pytest.raises(ParseError, match="utf-8"):
        parse_ratls_cert(bad_usage)
    with pytest.raises(VerifyError, match="no attestation"):
        verify_cert_binding(plain)
    garbage = _cert_with({OID_ATTESTATION: wrap_extension_value(b"\x07garbage")})
    with pytest.raises(ParseError):
        verify_cert_binding(garbage)
