"""a certificate whose version field is not v1-v3: OpenSSL reads it, cryptography raises its own
`InvalidVersion` (no ValueError). A fuzzing finding (the ratls_cert target): such a certificate
in a quote's PCK chain got past the verifier's `except ValueError` as a foreign exception. Every
certificate from outside is loaded through `pydstack.crypto.certload` now.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from pydstack.attest.errors import VerifyError
from pydstack.attest.verify import precheck_quote
from pydstack.crypto.certload import load_cert_der, load_cert_pem, load_certs_pem
from pydstack.tee.mockpki import PlatformTcb
from pydstack.tee.simulated import SimulatedTdx

#: the DER of `[0] EXPLICIT INTEGER 2` (v3), the first field of every v3 certificate's TBS
V3, V4 = b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x03"


def pem_of(der: bytes) -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = b"\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"


def td() -> SimulatedTdx:
    seed = bytes.fromhex("e5" * 32)
    ppid = hashlib.sha256(seed).digest()[:16]
    return SimulatedTdx(seed, platform=PlatformTcb(ppid=ppid, fmspc=bytes.fromhex("00906ED50042")))


def test_the_loaders_refuse_a_fourth_version_with_a_value_error():
    tdx = td()
    quote = tdx.get_quote(b"x")
    start = quote.index(b"-----BEGIN CERTIFICATE-----")
    end = quote.index(b"-----END CERTIFICATE-----", start) + len(b"-----END CERTIFICATE-----")
    good = load_cert_pem(quote[start:end])
    der = good.public_bytes(Encoding.DER)
    assert V3 in der
    bad = der.replace(V3, V4, 1)
    with pytest.raises(x509.InvalidVersion):  # what cryptography alone does
        x509.load_der_x509_certificate(bad)
    for load, data in (
        (load_cert_der, bad),
        (load_cert_pem, pem_of(bad)),
        (load_certs_pem, pem_of(der) + pem_of(bad)),
    ):
        with pytest.raises(ValueError, match="version is not 1, 2 or 3"):
            load(data)  # type: ignore[operator]


def test_a_quote_whose_pck_certificate_has_a_fourth_version_is_a_verify_error():
    tdx = td()
    quote = tdx.get_quote(b"x")
    assert precheck_quote(quote, tdx.root_ca_der) == "00906ED50042"
    start = quote.index(b"-----BEGIN CERTIFICATE-----")
    end = quote.index(b"-----END CERTIFICATE-----", start) + len(b"-----END CERTIFICATE-----")
    leaf_pem = quote[start:end]
    der = base64.b64decode(b"".join(leaf_pem.split(b"\n")[1:-1]))
    bad_pem = pem_of(der.replace(V3, V4, 1)).rstrip(b"\n")
    assert len(bad_pem) == len(leaf_pem)  # the quote's lengths stay right
    hostile = quote[:start] + bad_pem + quote[end:]
    with pytest.raises(VerifyError, match="version is not 1, 2 or 3"):
        precheck_quote(hostile, tdx.root_ca_der)


def test_the_collateral_lookup_of_such_a_quote_is_a_verify_error():
    from pydstack.attest import verify

    tdx = td()
    quote = tdx.get_quote(b"x")
    start = quote.index(b"-----BEGIN CERTIFICATE-----")
    end = quote.index(b"-----END CERTIFICATE-----", start) + len(b"-----END CERTIFICATE-----")
    der = base64.b64decode(b"".join(quote[start:end].split(b"\n")[1:-1]))
    with pytest.raises(VerifyError, match="version is not 1, 2 or 3"):
        verify._claimed_fmspc(pem_of(der.replace(V3, V4, 1)))  # the cache key of a lookup
