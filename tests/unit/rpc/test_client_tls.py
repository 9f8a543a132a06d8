"""the prpc client's TLS contexts: the system's roots only where they decide (loading them costs
~50 ms a client), exactly the given CA where one is given, none where the server's
attestation is the trust."""

from __future__ import annotations

import ssl

from pydstack.crypto.certs import CertRequest, cert_pem, generate_p256_key, issue_cert, key_pem
from pydstack.rpc.client import client_ssl_context


def _ca() -> tuple[str, str]:
    key = generate_p256_key()
    cert = issue_cert(CertRequest("test ca", ca_level=1), key.public_key(), key)
    return cert_pem(cert), key_pem(key)


def test_system_trust_is_loaded_once_and_shared():
    a, b = client_ssl_context(), client_ssl_context()
    assert a is b and a.verify_mode == ssl.CERT_REQUIRED and a.check_hostname
    assert a.cert_store_stats()["x509_ca"] > 0


def test_attested_servers_skip_the_system_roots():
    ctx = client_ssl_context(attested=True)
    assert ctx.verify_mode == ssl.CERT_NONE and ctx.cert_store_stats()["x509_ca"] == 0
    assert ctx is not client_ssl_context(attested=True)  # not shared: clients may add certs


def test_a_given_ca_is_the_only_trust():
    ca, _ = _ca()
    ctx = client_ssl_context(ca_pem=ca, attested=True)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.cert_store_stats()["x509_ca"] == 1


def test_client_certificates_load_from_memory():
    cert, key = _ca()
    ctx = client_ssl_context(attested=True, client_cert_pem=cert, client_key_pem=key)
    assert ctx.verify_mode == ssl.CERT_NONE  # and the chain loaded without error
