"""certificate issuing in upstream's rcgen profile, checked against the simulator's KMS CA."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from pydstack.attest.ratls import (
    OID_APP_ID,
    OID_APP_INFO,
    OID_ATTESTATION,
    OID_SPECIAL_USAGE,
    parse_ratls_cert,
)
from pydstack.crypto.certs import (
    CertRequest,
    cert_pem,
    generate_p256_key,
    issue_cert,
    key_pem,
    load_cert_pem,
    load_key_pem,
    ra_tls_client_cert,
    spki_der,
)

DAY = 86400
CaPair = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


@pytest.fixture(scope="module")
def sim_ca(vectors: Path) -> CaPair:
    keys = json.loads((vectors / "dstack/simulator_appkeys.json").read_text())
    return load_cert_pem(keys["ca_cert"]), load_key_pem(keys["key_provider"]["None"]["key"])


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _serial(key: ec.EllipticCurvePrivateKey) -> int:
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return int.from_bytes(hashlib.sha256(point).digest()[:20], "big") & ((1 << 159) - 1)


def test_kms_ca_matches_upstream_bytes(sim_ca: CaPair) -> None:
    """the simulator's "Dstack KMS CA" (issued by upstream rcgen) re-issued from its key gives
    the very same to-be-signed bytes: subject, serial, validity, extensions and their order."""
    upstream, key = sim_ca
    mine = issue_cert(
        CertRequest(
            "Dstack KMS CA",
            org_name="Dstack",
            ca_level=1,
            not_after=int(upstream.not_valid_after_utc.timestamp()),
        ),
        key.public_key(),
        key,
    )
    assert mine.tbs_certificate_bytes == upstream.tbs_certificate_bytes
    assert mine.serial_number == _serial(key) == 0x53BF34D7E92B0ACD8EA487677B7B7A396AC9D9F3
    assert (
        mine.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        == (hashlib.sha256(spki_der(key.public_key())).digest()[:20])
    )
    mine.verify_directly_issued_by(mine)
    # the key-provider id the simulator measures is this CA's 91-byte SPKI DER
    assert len(spki_der(key.public_key())) == 91
    assert spki_der(key.public_key()).hex().endswith("8482c0")


def test_leaf_profile(sim_ca: CaPair) -> None:
    ca, ca_key = sim_ca
    key = generate_p256_key()
    before = int(time.time())
    cert = issue_cert(
        CertRequest(
            "app.example",
            org_name="Acme",
            alt_names=("app.example", "10.0.0.1", "::1", "*.app.example"),
            usage_server_auth=True,
            usage_client_auth=True,
            app_id=b"\x05" * 20,
            app_info=b"\x98info",
            special_usage="app:custom",
            attestation=b"\x00att",
        ),
        key.public_key(),
        ca_key,
        ca,
    )
    after = int(time.time())
    cert = x509.load_der_x509_certificate(_der(cert))
    cert.verify_directly_issued_by(ca)
    assert cert.issuer == ca.subject
    assert cert.subject.rfc4514_string() == "CN=app.example,O=Acme"
    assert cert.serial_number == _serial(key)
    assert cert.signature_algorithm_oid == x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256
    assert cert.not_valid_before_utc == dt.datetime(1975, 1, 1, tzinfo=dt.UTC)
    not_after = int(cert.not_valid_after_utc.timestamp())
    assert before + 3650 * DAY <= not_after <= after + 3650 * DAY
    # rcgen's order; no SKI or BasicConstraints on a leaf
    assert [e.oid for e in cert.extensions] == [
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        OID_APP_ID,
        OID_APP_INFO,
        OID_SPECIAL_USAGE,
        OID_ATTESTATION,
    ]
    assert [e.critical for e in cert.extensions] == [False, True] + [False] * 5
    assert bytes.fromhex("0603551d0f0101ff0405 0303078000".replace(" ", "")) in _der(cert)
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.crl_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [type(n) for n in san] == [x509.DNSName, x509.IPAddress, x509.IPAddress, x509.DNSName]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    info = parse_ratls_cert(cert)
    assert (info.app_id, info.app_info, info.special_usage, info.attestation) == (
        b"\x05" * 20,
        b"\x98info",
        "app:custom",
        b"\x00att",
    )


def test_minimal_and_ca_variants() -> None:
    key = generate_p256_key()
    plain = issue_cert(CertRequest(""), key.public_key(), key)  # SDKs send empty subjects
    assert [e.oid for e in plain.extensions] == [ExtensionOID.KEY_USAGE]
    assert bytes.fromhex("300b3109300706035504030c00".replace(" ", "")) in _der(plain)
    long_cn = issue_cert(CertRequest("a" * 100, org_name="o" * 70), key.public_key(), key)
    assert b"\x0c\x64" + b"a" * 100 in _der(long_cn)
    ca = issue_cert(CertRequest("Dstack App CA", ca_level=0), key.public_key(), key)
    assert [e.oid for e in ca.extensions] == [
        ExtensionOID.KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.BASIC_CONSTRAINTS,
    ]
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and ku.digital_signature
    # an empty special usage is still written, as upstream's Some("")
    empty = issue_cert(CertRequest("x", special_usage=""), key.public_key(), key)
    assert parse_ratls_cert(empty).special_usage == ""
    # explicit validity; GeneralizedTime from 2050 on
    nb, na = 1_700_000_000, 2_600_000_000
    cert = issue_cert(CertRequest("x", not_before=nb, not_after=na), key.public_key(), key)
    assert int(cert.not_valid_before_utc.timestamp()) == nb
    assert int(cert.not_valid_after_utc.timestamp()) == na
    assert b"\x18\x0f20520522141320Z" in _der(cert)  # GeneralizedTime


def test_bad_requests_are_value_errors() -> None:
    key = generate_p256_key()
    pub = key.public_key()
    for req, msg in (
        (CertRequest("x", not_before=10, not_after=10), "earlier"),
        (CertRequest("x", not_after=2**64 - 1), "between 1970 and 9999"),
        (CertRequest("x", not_before=-1), "between 1970 and 9999"),
        (CertRequest("x", ca_level=256), "ca_level"),
        (CertRequest("x", ca_level=-1), "ca_level"),
        (CertRequest("x", alt_names=("bücher.example",)), "not ascii"),
    ):
        with pytest.raises(ValueError, match=msg):
            issue_cert(req, pub, key)
    # a scoped IPv6 address is not an IP SAN
    cert = issue_cert(CertRequest("x", alt_names=("fe80::1%eth0",)), pub, key)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fe80::1%eth0"]


def test_pem_helpers_and_client_cert(sim_ca: CaPair) -> None:
    ca, ca_key = sim_ca
    key = generate_p256_key()
    assert load_key_pem(key_pem(key)).private_numbers() == key.private_numbers()
    assert key_pem(key).startswith("-----BEGIN PRIVATE KEY-----\n")
    cert = issue_cert(CertRequest("x"), key.public_key(), key)
    assert load_cert_pem(cert_pem(cert)) == cert
    with pytest.raises(ValueError):
        load_key_pem("not a pem")
    seen: list[bytes] = []

    def attest(spki: bytes) -> bytes:
        seen.append(spki)
        return b"\x00bound"

    leaf_pem, leaf_key_pem = ra_tls_client_cert(cert_pem(ca), key_pem(ca_key), attest)
    leaf, leaf_key = load_cert_pem(leaf_pem), load_key_pem(leaf_key_pem)
    leaf.verify_directly_issued_by(ca)
    assert seen == [spki_der(leaf_key.public_key())] == [spki_der(leaf.public_key())]  # type: ignore[arg-type]
    assert leaf.subject.rfc4514_string() == "CN=RA-TLS TEMP Cert"
    assert parse_ratls_cert(leaf).attestation == b"\x00bound"
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext, name: str) -> bytes | None:
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=name)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        done = 0
        for side in (c, s):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done == 2:
            return s.getpeercert(binary_form=True)
    raise AssertionError("handshake did not finish")


def test_openssl_accepts_the_profile_for_mutual_tls(tmp_path: Path, sim_ca: CaPair) -> None:
    """OpenSSL (what TLS here runs on) verifies an rcgen-profile chain both ways."""
    ca, ca_key = sim_ca
    files = {}
    for role, req in (
        ("server", CertRequest("kms.local", alt_names=("kms.local",), usage_server_auth=True)),
        ("client", CertRequest("RA-TLS TEMP Cert", usage_client_auth=True)),
    ):
        key = generate_p256_key()
        cert = issue_cert(req, key.public_key(), ca_key, ca)
        (tmp_path / f"{role}.crt").write_text(cert_pem(cert))
        (tmp_path / f"{role}.key").write_text(key_pem(key))
        files[role] = cert
    (tmp_path / "ca.crt").write_text(cert_pem(ca))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    server.load_verify_locations(tmp_path / "ca.crt")
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_cert_chain(tmp_path / "client.crt", tmp_path / "client.key")
    client.load_verify_locations(tmp_path / "ca.crt")
    assert _handshake(client, server, "kms.local") == _der(files["client"])
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(client, server, "other.local")
