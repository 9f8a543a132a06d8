"""certificates that cryptography itself refuses to read end as ParseError (an AttestError),
never as its own exception types, which once got past the KMS's `except AttestError`."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID, NameOID

from pydstack.attest.errors import AttestError, ParseError
from pydstack.attest.ratls import OID_APP_ID, parse_ratls_cert, verify_cert_binding
from pydstack.tee.mockpki import _oid

KEY = ec.generate_private_key(ec.SECP256R1())
NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hostile")])


def _builder() -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(NAME)
        .issuer_name(NAME)
        .public_key(KEY.public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime(2024, 1, 1))
        .not_valid_after(dt.datetime(2034, 1, 1))
    )


def x400_san_cert() -> x509.Certificate:
    """a subjectAltName holding an x400Address ([3] ORAddress)."""
    san = x509.UnrecognizedExtension(
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME, bytes([0x30, 0x04, 0xA3, 0x02, 0x30, 0x00])
    )
    return _builder().add_extension(san, False).sign(KEY, hashes.SHA256())


def duplicate_extension_cert() -> x509.Certificate:
    """the app-id extension twice (the builder refuses that, so the second oid is rewritten in
    the DER; the signature no longer matters: extensions are read before it is checked)."""
    other = x509.ObjectIdentifier(OID_APP_ID.dotted_string[:-1] + "9")
    value = b"\x04\x14" + bytes(20)
    cert = (
        _builder()
        .add_extension(x509.UnrecognizedExtension(OID_APP_ID, value), False)
        .add_extension(x509.UnrecognizedExtension(other, value), False)
        .sign(KEY, hashes.SHA256())
    )
    der = cert.public_bytes(Encoding.DER)
    body, other_body = _oid_body(OID_APP_ID), _oid_body(other)
    assert len(body) == len(other_body)
    i = der.rindex(bytes([0x06, len(other_body)]) + other_body)
    der = der[: i + 2] + body + der[i + 2 + len(body) :]
    return x509.load_der_x509_certificate(der)


def _oid_body(oid: x509.ObjectIdentifier) -> bytes:
    return _oid(oid.dotted_string)[2:]  # the DER OBJECT IDENTIFIER without tag and length


@pytest.mark.parametrize("make", [x400_san_cert, duplicate_extension_cert])
def test_unreadable_extensions_are_parse_errors(make):
    cert = make()
    with pytest.raises(ParseError, match="extensions are malformed"):
        parse_ratls_cert(cert)
    with pytest.raises(AttestError):
        verify_cert_binding(cert)
