"""the cert store: one-level wildcard matching, refusals that keep the old certificate,
TLS versions, and session-ticket keys shared between contexts."""

from __future__ import annotations

import os
import ssl
import sys
from pathlib import Path

import pytest

from pydstack.gateway.certstore import CertStore, CertStoreError, tls_version_range
from pydstack.gateway.tickets import set_ticket_keys

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integration"))
import contextlib

from gateway_env import make_pki


def test_wildcard_matches_one_level_only() -> None:
    store = CertStore()
    pki = make_pki("example.com")
    store.set("*.Example.COM.", pki.chain_pem, pki.key_pem)
    assert store.domains() == ["example.com"]
    assert store.for_sni("app-8080.example.com") is not None
    assert store.for_sni("a.b.example.com") is None
    assert store.for_sni("example.com") is None
    assert store.for_sni("app.other.com") is None


def test_bad_updates_keep_the_old_certificate() -> None:
    store = CertStore()
    good = make_pki("example.com")
    entry = store.set("example.com", good.chain_pem, good.key_pem)
    other = make_pki("example.com")
    expired = make_pki("example.com", expired=True)
    cases = [
        (expired.chain_pem, expired.key_pem, "has expired"),
        ("not a pem", good.key_pem, "not pem"),
        (good.chain_pem, other.key_pem, "does not load"),
        (good.chain_pem, "garbage", "does not load"),
    ]
    for chain, key, message in cases:
        with pytest.raises(CertStoreError, match=message):
            store.set("example.com", chain, key)
        assert store.get("example.com") is entry


def test_one_bad_domain_does_not_block_another() -> None:
    store = CertStore()
    expired = make_pki("a.test", expired=True)
    with pytest.raises(CertStoreError):
        store.set("a.test", expired.chain_pem, expired.key_pem)
    ok = make_pki("b.test")
    store.set("b.test", ok.chain_pem, ok.key_pem)
    assert store.domains() == ["b.test"]
    store.remove("b.test")
    assert store.domains() == []


def test_contexts_follow_tls_versions_and_alpn() -> None:
    pki = make_pki("v.test")
    only12 = CertStore(["1.2"]).set("v.test", pki.chain_pem, pki.key_pem)
    assert only12.plain.maximum_version is ssl.TLSVersion.TLSv1_2
    both = CertStore(["1.3", "1.2"]).set("v.test", pki.chain_pem, pki.key_pem)
    assert (both.plain.minimum_version, both.plain.maximum_version) == (
        ssl.TLSVersion.TLSv1_2,
        ssl.TLSVersion.TLSv1_3,
    )
    for bad in ([], ["1.1"], ["tls1.3"]):
        with pytest.raises(CertStoreError):
            tls_version_range(bad)
    # a TLS 1.2 client cannot make the gateway renegotiate (a handshake's cost, on demand)
    for ctx in (only12.plain, only12.h2, both.plain, both.h2):
        assert ctx.options & ssl.OP_NO_RENEGOTIATION


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, session: ssl.SSLSession | None):
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname="x.t.test", session=session)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for obj in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    # read the post-handshake tickets
    with contextlib.suppress(ssl.SSLWantReadError):
        c.read(1)
    return c


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_shared_ticket_keys_resume_across_contexts(version: ssl.TLSVersion) -> None:
    pki = make_pki("t.test")
    keys = os.urandom(80)
    a = CertStore(("1.2", "1.3"), ticket_keys=keys).set("t.test", pki.chain_pem, pki.key_pem).plain
    b = CertStore(("1.2", "1.3"), ticket_keys=keys).set("t.test", pki.chain_pem, pki.key_pem).plain
    c = (
        CertStore(("1.2", "1.3"), ticket_keys=os.urandom(80))
        .set("t.test", pki.chain_pem, pki.key_pem)
        .plain
    )
    client = pki.client_context()
    client.minimum_version = client.maximum_version = version
    first = _handshake(a, client, None)
    assert first.session is not None
    assert _handshake(b, client, first.session).session_reused
    assert not _handshake(c, client, first.session).session_reused


def test_ticket_keys_must_be_80_bytes() -> None:
    with pytest.raises(ValueError):
        set_ticket_keys(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), b"short")
