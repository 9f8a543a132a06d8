"""CertSigningRequestV2: upstream's golden SCALE bytes, signing and verification."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.attest.attestation import Attestation, decode_versioned, encode_v0
from pydstack.attest.errors import ParseError, VerifyError
from pydstack.crypto.certs import generate_p256_key, spki_der
from pydstack.crypto.csr import CONFIRM, CertConfigV2, CertSigningRequestV2

# dstack/ra-tls/src/cert.rs test_csr_v2_scale_encoding_stable{,_with_tdx_quote} (312dc605)
GOLDEN = (
    "44706c65617365207369676e20636572743a0c0102030040746573742e6578616d706c652e636f6d"
    "00010000000000000000000000000000000000000000000000000000000000000000000000000000"
    "00000000000000000000000000000000000000000000000000000000000000000000000000"
)
GOLDEN_WITH_QUOTE = (
    "44706c65617365207369676e20636572743a0c0102030040746573742e6578616d706c652e636f6d"
    "00010001000000000004090000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000000000000000"
)


def _empty_attestation(quote: bytes) -> bytes:
    return encode_v0(Attestation(quote, (), (), bytes(64), ""))


def _csr(ext_quote: bool, quote: bytes) -> CertSigningRequestV2:
    config = CertConfigV2(
        org_name=None,
        subject="test.example.com",
        subject_alt_names=(),
        usage_server_auth=True,
        usage_client_auth=False,
        ext_quote=ext_quote,
    )
    return CertSigningRequestV2(CONFIRM, b"\x01\x02\x03", config, _empty_attestation(quote))


def test_golden_scale_bytes() -> None:
    for csr, golden in (
        (_csr(False, b""), GOLDEN),
        (_csr(True, b"\x09"), GOLDEN_WITH_QUOTE),
    ):
        assert csr.encode().hex() == golden
        back = CertSigningRequestV2.decode(bytes.fromhex(golden))
        assert back == csr
        att = decode_versioned(back.attestation)
        assert att.report_data == bytes(64) and att.config == ""
    assert decode_versioned(_csr(True, b"\x09").attestation).quote == b"\x09"


def test_full_config_roundtrip() -> None:
    config = CertConfigV2(
        org_name="Acme",
        subject="app.example",
        subject_alt_names=("app.example", "10.0.0.1", "ü.example"),
        usage_server_auth=True,
        usage_client_auth=True,
        ext_quote=True,
        ext_app_info=True,
        not_before=0,
        not_after=(1 << 64) - 1,
    )
    csr = CertSigningRequestV2(CONFIRM, b"k" * 91, config, b"\x00rest of the attestation")
    raw = csr.encode()
    assert CertSigningRequestV2.decode(raw) == csr
    # Option<String> Some = 01 + compact len + utf-8; u64 little-endian
    assert b"\x01\x10Acme" in raw and b"\x01" + b"\xff" * 8 in raw
    assert b"\x01\x00\x00\x00\x00\x00\x00\x00\x00" in raw  # Some(0)
    with pytest.raises(ValueError, match="u64"):
        dataclasses.replace(csr, config=dataclasses.replace(config, not_after=1 << 64)).encode()


def test_decode_refuses_malformed() -> None:
    raw = bytes.fromhex(GOLDEN)
    for cut in (0, 5, 20, 40):
        with pytest.raises(ParseError):
            CertSigningRequestV2.decode(raw[:cut])
    bad_bool = bytearray(raw)
    bad_bool[41] = 2  # usage_server_auth
    with pytest.raises(ParseError, match="bool"):
        CertSigningRequestV2.decode(bytes(bad_bool))
    bad_option = bytearray(raw)
    bad_option[22] = 7  # org_name tag
    with pytest.raises(ParseError, match="option"):
        CertSigningRequestV2.decode(bytes(bad_option))
    with pytest.raises(ParseError, match="length"):
        CertSigningRequestV2.decode(b"\xfd\xff\xff\xff" + raw)  # a 1 GiB string
    with pytest.raises(ParseError, match="too large"):
        CertSigningRequestV2.decode(bytes(11 * 1024 * 1024))


def test_sign_and_verify() -> None:
    key = generate_p256_key()
    csr = dataclasses.replace(_csr(True, b"\x09"), pubkey=spki_der(key.public_key()))
    sig = csr.sign(key)
    csr.verify(sig)
    CertSigningRequestV2.decode(csr.encode()).verify(sig)
    # any change to the signed fields breaks the signature
    for changed in (
        dataclasses.replace(csr, attestation=csr.attestation + b"\x00"),
        dataclasses.replace(csr, config=dataclasses.replace(csr.config, subject="evil")),
        dataclasses.replace(csr, pubkey=spki_der(generate_p256_key().public_key())),
    ):
        with pytest.raises(VerifyError, match="signature is invalid"):
            changed.verify(sig)
    with pytest.raises(VerifyError, match="signature is invalid"):
        csr.verify(b"\x30\x00")
    wrong_word = dataclasses.replace(csr, confirm="please sign cert")
    with pytest.raises(VerifyError, match="confirm word"):
        wrong_word.verify(wrong_word.sign(key))
    with pytest.raises(ParseError, match="public key is invalid"):
        _csr(False, b"").verify(sig)
    p384 = ec.generate_private_key(ec.SECP384R1())
    other_curve = dataclasses.replace(csr, pubkey=spki_der(p384.public_key()))
    with pytest.raises(ParseError, match="p-256"):
        other_curve.verify(sig)
    with pytest.raises(ValueError, match="p-256"):
        csr.sign(p384)
