"""property tests: arbitrary or mutated bytes end in the library's own parse error."""

from __future__ import annotations

import contextlib

from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pydstack.attest.attestation import decode_versioned
from pydstack.attest.errors import ParseError
from pydstack.attest.eventlog import event_log_from_json, parse_ccel
from pydstack.attest.identity import AppInfo
from pydstack.attest.quote import parse_quote
from pydstack.attest.ratls import (
    unwrap_extension_value,
    verify_cert_binding,
    wrap_extension_value,
)
from pydstack.crypto.certs import CertRequest, generate_p256_key, issue_cert
from tests.conftest import VECTORS

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
QUOTE = (VECTORS / "dcap-qvl/tdx_quote").read_bytes()
QUOTE_V5 = (VECTORS / "dcap-qvl/tdx_quote_outdated").read_bytes()
ATTESTATION = (VECTORS / "dstack/simulator_attestation.bin").read_bytes()
CCEL = (VECTORS / "dstack/ccel.bin").read_bytes()[:4096]


def _mutate(base: bytes) -> st.SearchStrategy[bytes]:
    @st.composite
    def strategy(draw: st.DrawFn) -> bytes:
        data = bytearray(base)
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] if draw(st.booleans()) else data
        for _ in range(draw(st.integers(0, 8))):
            if not data:
                break
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        return bytes(data)

    return strategy()


def _parses_or_parse_error(fn, data) -> None:  # type: ignore[no-untyped-def]
    with contextlib.suppress(ParseError):
        fn(data)


@SETTINGS
@given(st.one_of(st.binary(max_size=2048), _mutate(QUOTE), _mutate(QUOTE_V5)))
def test_quote_parser(data: bytes) -> None:
    _parses_or_parse_error(parse_quote, data)


@SETTINGS
@given(st.one_of(st.binary(max_size=2048), _mutate(ATTESTATION)))
def test_attestation_decoder(data: bytes) -> None:
    _parses_or_parse_error(decode_versioned, data)


@SETTINGS
@given(st.one_of(st.binary(max_size=2048), _mutate(CCEL)))
def test_ccel_parser(data: bytes) -> None:
    _parses_or_parse_error(parse_ccel, data)


@SETTINGS
@given(st.one_of(st.text(max_size=512), st.binary(max_size=512)))
def test_event_log_json(data: str | bytes) -> None:
    _parses_or_parse_error(event_log_from_json, data)


@SETTINGS
@given(st.binary(max_size=1024))
def test_app_info_msgpack(data: bytes) -> None:
    _parses_or_parse_error(AppInfo.from_msgpack, data)


@SETTINGS
@given(st.binary(max_size=512))
def test_extension_unwrap(data: bytes) -> None:
    _parses_or_parse_error(unwrap_extension_value, data)
    assert unwrap_extension_value(wrap_extension_value(data)) == data


_KEY = generate_p256_key()


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.binary(max_size=600), _mutate(ATTESTATION[:2000])))
def test_certificate_attestation_extension(data: bytes) -> None:
    cert = issue_cert(CertRequest("fuzz", attestation=data), _KEY.public_key(), _KEY)
    assert isinstance(cert, x509.Certificate)
    try:
        verify_cert_binding(cert)
    except ParseError:
        pass
    except ValueError as e:  # VerifyError is the other allowed outcome
        assert type(e).__name__ == "VerifyError"
