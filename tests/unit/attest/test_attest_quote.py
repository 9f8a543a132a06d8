"""quote parsing and building on real quotes."""

from __future__ import annotations

import hashlib

import dcap_qvl
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509 import load_pem_x509_certificates

from pydstack.attest.errors import ParseError
from pydstack.attest.quote import (
    BODY_TD_REPORT10,
    BODY_TD_REPORT15,
    TEE_TYPE_TDX,
    build_quote,
    parse_quote,
)

TDX_QUOTES = [
    "dcap-qvl/tdx_quote",
    "dcap-qvl/tdx_quote_outdated",
    "dstack/ra-tls_tdx_quote",
]


def _load(vectors, name: str) -> bytes:
    data = (vectors / name).read_bytes()
    if name.endswith(".hex"):
        return bytes.fromhex(data.decode().strip().removeprefix("0x"))
    return data


@pytest.mark.parametrize(
    "name", [*TDX_QUOTES, "dcap-qvl/tdx-quote.hex", "dcap-qvl/quote-from-tappd.hex"]
)
def test_tdx_quote_fields_match_dcap_qvl(vectors, name):
    raw = _load(vectors, name)
    quote = parse_quote(raw)
    ref = dcap_qvl.parse_quote(raw)
    assert quote.is_tdx and quote.header.tee_type == TEE_TYPE_TDX
    assert quote.header.version == ref.header.version
    assert quote.header.qe_vendor_id == ref.header.qe_vendor_id
    report = quote.td_report
    assert report is not None
    for field in ("mr_td", "rt_mr0", "rt_mr1", "rt_mr2", "rt_mr3", "report_data", "mr_config_id"):
        ours = getattr(report, field.replace("rt_mr", "rtmr"))
        assert ours == getattr(ref.report, field), field
    assert report.tee_tcb_svn == ref.report.tee_tcb_svn
    assert quote.pck_cert_chain_pem.rstrip(b"\0") == ref.cert_chain_pem_bytes().rstrip(b"\0")


def test_v5_quote_has_td15_body(vectors):
    q = parse_quote(_load(vectors, "dcap-qvl/tdx_quote_outdated"))
    assert q.header.version == 5
    assert q.body_type == BODY_TD_REPORT15
    assert q.td_report is not None and q.td_report.mr_service_td == bytes(48)
    assert q.signed_length == 48 + 6 + 648
    v4 = parse_quote(_load(vectors, "dcap-qvl/tdx_quote"))
    assert v4.body_type == BODY_TD_REPORT10 and v4.signed_length == 632


def test_sgx_v3_quote_parses(vectors):
    q = parse_quote(_load(vectors, "dcap-qvl/sgx_quote"))
    assert q.header.version == 3 and not q.is_tdx
    assert q.enclave_report is not None
    assert (
        q.report_data
        == dcap_qvl.parse_quote(_load(vectors, "dcap-qvl/sgx_quote")).report.report_data
    )


@pytest.mark.parametrize("name", TDX_QUOTES)
def test_signatures_and_qe_binding_verify(vectors, name):
    q = parse_quote(_load(vectors, name))

    def verify(pub: ec.EllipticCurvePublicKey, sig: bytes, data: bytes) -> None:
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        pub.verify(der, data, ec.ECDSA(hashes.SHA256()))

    att_key = ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), b"\x04" + q.attestation_key
    )
    verify(att_key, q.ecdsa_signature, q.signed_bytes)
    pck = load_pem_x509_certificates(q.pck_cert_chain_pem)[0].public_key()
    assert isinstance(pck, ec.EllipticCurvePublicKey)
    verify(pck, q.qe_report_signature, q.qe_report_raw)
    expected = hashlib.sha256(q.attestation_key + q.qe_auth_data).digest()
    assert q.qe_report.report_data[:32] == expected


def test_build_reproduces_a_real_quote(vectors):
    raw = _load(vectors, "dcap-qvl/tdx_quote")
    q = parse_quote(raw)
    assert q.td_report is not None
    rebuilt = build_quote(
        q.header,
        q.td_report,
        sign=lambda _: q.ecdsa_signature,
        attestation_key=q.attestation_key,
        qe_report=q.qe_report_raw,
        qe_report_signature=q.qe_report_signature,
        qe_auth_data=q.qe_auth_data,
        pck_cert_chain_pem=q.pck_cert_chain_pem,
    )
    assert raw.startswith(rebuilt)
    assert set(raw[len(rebuilt) :]) == {0}  # only the real quote's zero padding differs


def test_malformed_quotes_are_parse_errors(vectors):
    raw = _load(vectors, "dcap-qvl/tdx_quote")
    for bad in (b"", raw[:47], raw[:700], b"\x07\x00" + raw[2:], raw[:2] + b"\x09\x00" + raw[4:]):
        with pytest.raises(ParseError):
            parse_quote(bad)
    too_long_auth = bytearray(raw)
    too_long_auth[632:636] = (10**6).to_bytes(4, "little")
    with pytest.raises(ParseError, match="auth data length"):
        parse_quote(bytes(too_long_auth))


def test_sub_cursors_never_read_past_their_declared_length(vectors):
    """the auth data and certification data are read through cursors bounded by their own
    length fields: shrinking a length while the bytes stay in place (real quotes carry
    trailing padding) must refuse the quote, not read into the bytes beside it."""
    import struct

    raw = _load(vectors, "dcap-qvl/tdx_quote")
    q = parse_quote(raw)
    auth_at = q.signed_length
    (auth_len,) = struct.unpack_from("<I", raw, auth_at)
    shrunk_auth = raw[:auth_at] + struct.pack("<I", auth_len - 10) + raw[auth_at + 4 :]
    with pytest.raises(ParseError, match=r"exceeds the auth data|truncated"):
        parse_quote(shrunk_auth)
    cert_at = auth_at + 4 + 64 + 64  # after the signature and the attestation key
    (cert_type, cert_len) = struct.unpack_from("<HI", raw, cert_at)
    assert cert_type == 6
    shrunk_cert = raw[: cert_at + 2] + struct.pack("<I", cert_len - 10) + raw[cert_at + 6 :]
    with pytest.raises(ParseError, match="truncated"):
        parse_quote(shrunk_cert)


def test_the_one_unpack_auth_path_reads_what_the_checked_path_reads(vectors):
    # the auth data is unpacked at once when it all fits, else read field by field: for the
    # length fields at and around every bound, both give the same parts or the fast one
    # declines (and the checked one then raises or reads them)
    import struct

    from pydstack.attest.quote import _auth_checked, _auth_fast

    raw = _load(vectors, "dcap-qvl/tdx_quote")
    q = parse_quote(raw)
    start = q.signed_length + 4
    end = start + struct.unpack_from("<I", raw, q.signed_length)[0]
    qe_auth_at = start + 134 + 384 + 64
    inner_at = qe_auth_at + 2 + len(q.qe_auth_data)
    fields = {  # offset, struct format, genuine value
        "cert type": (start + 128, "<H", 6),
        "cert size": (start + 130, "<I", end - start - 134),
        "qe auth length": (qe_auth_at, "<H", len(q.qe_auth_data)),
        "inner type": (inner_at, "<H", 5),
        "inner size": (inner_at + 2, "<I", len(q.pck_cert_chain_pem)),
    }
    cases = [(raw[:cut], cut) for cut in range(start, end + 1, 7)]
    for at, fmt, genuine in fields.values():
        for value in {0, 1, 5, 6, genuine - 1, genuine, genuine + 1, 0xFFFF}:
            data = bytearray(raw)
            struct.pack_into(fmt, data, at, value)
            cases += [(bytes(data), end), (bytes(data), end - 1)]
    for short in range(1, 7):  # the inner header cut by the end of the quote
        data = bytearray(raw[:end])
        struct.pack_into("<H", data, qe_auth_at, end - qe_auth_at - 2 - short)
        cases.append((bytes(data), end))
    taken = 0
    for data, stop in cases:
        fast = _auth_fast(data, start, stop)
        try:
            checked = _auth_checked(data, start, stop, 4)
        except ParseError:
            assert fast is None
            continue
        assert fast is None or fast == checked
        taken += fast is not None
    assert taken >= 4
    assert _auth_fast(raw, start, end) == (
        q.ecdsa_signature,
        q.attestation_key,
        q.qe_report_raw,
        q.qe_report_signature,
        q.qe_auth_data,
        q.pck_cert_chain_pem,
    )
