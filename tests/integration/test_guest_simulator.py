"""the guest agent over the simulated tdx, as a real process, through its wire api."""

from __future__ import annotations

import base64
import grp
import hashlib
import json
import os
import stat
import subprocess
import sys

import httpx
import pytest
from cryptography import x509

from pydstack.attest.attestation import decode_versioned
from pydstack.attest.eventlog import event_log_from_json, replay_rtmrs
from pydstack.attest.identity import mr_config_id_v1
from pydstack.attest.quote import parse_quote
from pydstack.attest.ratls import parse_ratls_cert, verify_cert_binding
from pydstack.attest.report_data import to_report_data
from pydstack.attest.verify import verify_quote
from pydstack.crypto import ed25519, k256
from pydstack.crypto.kdf import derive_key
from pydstack.guest.appkeys import AppKeys

from .simulator_proc import Simulator, start_simulator

SEED = "5e" * 32


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    s = start_simulator(tmp_path_factory.mktemp("sim"), SEED)
    yield s
    s.stop()


def call(sim: Simulator, method: str, body: dict | None = None, *, tappd: bool = False):
    sock = sim.tappd_sock if tappd else sim.dstack_sock
    path = f"/prpc/Tappd.{method}" if tappd else f"/{method}"
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=30) as c:
        return c.post(f"http://localhost{path}", json=body or {})


def ok(sim: Simulator, method: str, body: dict | None = None, **kw) -> dict:
    r = call(sim, method, body, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def err(sim: Simulator, method: str, body: dict | None = None, **kw) -> str:
    r = call(sim, method, body, **kw)
    assert r.status_code == 400, r.text
    return r.json()["error"]


def test_get_key_is_the_kms_derivation(sim):
    keys = AppKeys.load(sim.dir / ".appkeys.json")
    info = ok(sim, "Info")
    app_id = bytes.fromhex(info["app_id"])
    r = ok(sim, "GetKey", {"path": "/wallet", "purpose": "ethereum"})
    key = bytes.fromhex(r["key"])
    assert key == derive_key(keys.k256_key, [b"/wallet"])
    sig0, sig1 = (bytes.fromhex(s) for s in r["signature_chain"])
    pub = k256.compressed_pubkey(key)
    app_pub = k256.recover_pubkey(k256.keccak256(f"ethereum:{pub.hex()}".encode()), sig0)
    assert app_pub == k256.compressed_pubkey(keys.k256_key)
    kms_pub = k256.recover_pubkey(k256.keccak256(b"dstack-kms-issued:" + app_id + app_pub), sig1)
    assert len(kms_pub) == 33
    assert ok(sim, "GetKey", {"path": "/wallet", "algorithm": "k256"})["key"] == r["key"]
    ed = ok(sim, "GetKey", {"path": "/wallet", "algorithm": "ed25519"})
    assert ed["key"] == r["key"]  # upstream: the algorithm changes interpretation only
    assert err(sim, "GetKey", {"algorithm": "rsa"}) == "Unsupported algorithm"
    assert err(sim, "GetKey", {"algorithm": "secp256k1_prehashed"}) == "Unsupported algorithm"


def test_quote_verifies_and_replays(sim):
    compose = (sim.dir / "app-compose.json").read_bytes()
    r = ok(sim, "GetQuote", {"report_data": "1234deadbeef"})
    quote = bytes.fromhex(r["quote"])
    assert r["report_data"] == "1234deadbeef" + "00" * 58
    root = (sim.dir / "mock-root-ca.der").read_bytes()
    collateral = (sim.dir / "collateral.json").read_text()
    verified = verify_quote(quote, collateral, root_ca_der=root)
    assert verified.status == "UpToDate"
    report = verified.quote.td_report
    assert report is not None
    events = event_log_from_json(r["event_log"])
    assert replay_rtmrs(events) == report.rtmrs
    runtime = [e.event for e in events if e.imr == 3]
    assert runtime[:6] == [
        "system-preparing",
        "app-id",
        "compose-hash",
        "instance-id",
        "boot-mr-done",
        "os-image-hash",
    ]
    assert runtime[-1] == "system-ready"
    compose_hash = hashlib.sha256(compose).digest()
    assert next(e for e in events if e.event == "compose-hash").event_payload == compose_hash
    assert report.mr_config_id == mr_config_id_v1(compose_hash)
    assert decode_versioned(bytes.fromhex(r["attestation"])).quote[:48] == quote[:48]
    assert json.loads(r["vm_config"])["cpu_count"] == 1
    assert err(sim, "GetQuote", {"report_data": "00" * 65}) == "Report data is too long"


def test_info_fields(sim):
    info = ok(sim, "Info")
    compose = (sim.dir / "app-compose.json").read_bytes()
    compose_hash = hashlib.sha256(compose).hexdigest()
    assert info["compose_hash"] == compose_hash
    assert info["app_id"] == compose_hash[:40]
    assert len(info["instance_id"]) == 40
    assert info["device_id"] == hashlib.sha256(b"").hexdigest()
    assert info["app_name"] == "simulator"
    assert json.loads(info["key_provider_info"])["name"] == "kms"
    tcb = json.loads(info["tcb_info"])
    for k in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"):
        assert len(tcb[k]) == 96
    assert tcb["compose_hash"] == compose_hash and tcb["app_compose"] == compose.decode()
    assert tcb["mr_aggregated"] == info["mr_aggregated"]
    cert = x509.load_pem_x509_certificates(info["app_cert"].encode())[0]
    assert verify_cert_binding(cert).report_data
    assert set(info) >= {"vm_config", "cloud_vendor", "cloud_product", "os_image_hash"}


def test_tls_keys(sim):
    a = ok(
        sim,
        "GetTlsKey",
        {
            "subject": "app.local",
            "alt_names": ["app.local", "127.0.0.1"],
            "usage_ra_tls": True,
            "usage_server_auth": True,
        },
    )
    b = ok(sim, "GetTlsKey", {"subject": "app.local"})
    assert a["key"].startswith("-----BEGIN PRIVATE KEY-----") and a["key"] != b["key"]
    leaf = x509.load_pem_x509_certificate(a["certificate_chain"][0].encode())
    ca = x509.load_pem_x509_certificate(a["certificate_chain"][1].encode())
    assert leaf.issuer == ca.subject
    assert parse_ratls_cert(leaf).special_usage == "app:custom"
    att = verify_cert_binding(leaf)
    root = (sim.dir / "mock-root-ca.der").read_bytes()
    assert verify_quote(att.quote, (sim.dir / "collateral.json").read_text(), root_ca_der=root)
    info = ok(sim, "GetTlsKey", {"subject": "x", "with_app_info": True})
    leaf2 = x509.load_pem_x509_certificate(info["certificate_chain"][0].encode())
    assert parse_ratls_cert(leaf2).app_info
    assert err(sim, "GetTlsKey", {"not_before": 10, "not_after": 5}) == (
        "not_before must be earlier than not_after"
    )


def test_sign_and_verify(sim):
    for alg, data in (
        ("ed25519", "00ff"),
        ("secp256k1", "00ff"),
        ("secp256k1_prehashed", "11" * 32),
    ):
        s = ok(sim, "Sign", {"algorithm": alg, "data": data})
        assert len(s["signature_chain"]) == 3 and s["signature_chain"][0] == s["signature"]
        v = ok(
            sim,
            "Verify",
            {
                "algorithm": alg,
                "data": data,
                "signature": s["signature"],
                "public_key": s["public_key"],
            },
        )
        assert v == {"valid": True}
        other = "22" * 32 if alg == "secp256k1_prehashed" else "01"
        v = ok(
            sim,
            "Verify",
            {
                "algorithm": alg,
                "data": other,
                "signature": s["signature"],
                "public_key": s["public_key"],
            },
        )
        assert v == {"valid": False}
    assert err(sim, "Sign", {"algorithm": "rsa", "data": "00"}) == "Unsupported algorithm"
    assert err(sim, "Sign", {"algorithm": "secp256k1_prehashed", "data": "00"}) == (
        "Pre-hashed signing requires a 32-byte digest, but received 1 bytes"
    )
    assert "invalid public key" in err(
        sim,
        "Verify",
        {"algorithm": "ed25519", "data": "00", "signature": "00" * 64, "public_key": "00"},
    )


def test_attest_and_version(sim):
    att = decode_versioned(bytes.fromhex(ok(sim, "Attest", {"report_data": "ab"})["attestation"]))
    assert att.report_data == b"\xab" + bytes(63)
    assert parse_quote(att.quote).report_data == att.report_data
    assert ok(sim, "Version")["version"] == "0.6.0"
    assert "unavailable in simulator mode" in err(sim, "EmitEvent", {"event": "x"})


def test_tappd(sim):
    r = ok(sim, "TdxQuote", {"report_data": b"test content".hex()}, tappd=True)
    assert r["hash_algorithm"] == "sha512" and r["prefix"] == "app-data"
    q = parse_quote(bytes.fromhex(r["quote"]))
    assert q.report_data == to_report_data("app-data", b"test content")
    assert err(sim, "TdxQuote", {"report_data": "00", "hash_algorithm": "raw"}, tappd=True) == (
        "invalid content length"
    )
    assert err(sim, "TdxQuote", {"report_data": "00", "hash_algorithm": "md5"}, tappd=True) == (
        "invalid hash algorithm"
    )
    raw = ok(sim, "RawQuote", {"report_data": "ab" * 64}, tappd=True)
    assert parse_quote(bytes.fromhex(raw["quote"])).report_data == b"\xab" * 64
    k1 = ok(sim, "DeriveKey", {"path": "/a", "subject": "a"}, tappd=True)
    k2 = ok(sim, "DeriveKey", {"path": "/a", "subject": "a"}, tappd=True)
    k3 = ok(sim, "DeriveKey", {"path": "/b"}, tappd=True)
    assert k1["key"] == k2["key"] != k3["key"]
    d = ok(sim, "DeriveK256Key", {"path": "/a"}, tappd=True)
    assert len(bytes.fromhex(d["k256_key"])) == 32 and len(d["k256_signature_chain"]) == 2


def test_worker_external_api(sim):
    keys = AppKeys.load(sim.dir / ".appkeys.json")
    vms = derive_key(keys.k256_key, [b"vms"])
    with httpx.Client(timeout=30) as c:
        r = c.post(
            f"{sim.external}/prpc/Worker.GetAttestationForAppKey", json={"algorithm": "secp256k1"}
        )
        assert r.status_code == 200
        text = (
            "dip1::secp256k1c-pk:"
            + base64.urlsafe_b64encode(k256.compressed_pubkey(vms)).rstrip(b"=").decode()
        )
        assert bytes.fromhex(r.json()["report_data"]) == text.encode().ljust(64, b"\0")
        r = c.post(f"{sim.external}/prpc/GetAttestationForAppKey", json={"algorithm": "ed25519"})
        text = (
            "dip1::ed25519-pk:"
            + base64.urlsafe_b64encode(ed25519.public_key(vms)).rstrip(b"=").decode()
        )
        assert bytes.fromhex(r.json()["report_data"]).rstrip(b"\0") == text.encode()
        assert c.post(f"{sim.external}/prpc/Worker.Info", json={}).json()["tcb_info"]
        r = c.post(f"{sim.external}/prpc/GetAttestationForAppKey", json={"algorithm": ""})
        assert r.status_code == 400 and r.json()["error"] == "Unsupported algorithm"


def test_curl_examples(sim):
    sock = str(sim.dstack_sock)

    def curl(*args: str) -> dict:
        out = subprocess.run(
            ["curl", "-s", "--unix-socket", sock, *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        return json.loads(out)

    tls = curl(
        "-X",
        "POST",
        "http://dstack/GetTlsKey",
        "-H",
        "Content-Type: application/json",
        "-d",
        '{"subject": "example.com", "alt_names": ["www.example.com", "api.example.com"], '
        '"usage_ra_tls": true, "usage_server_auth": true, "usage_client_auth": false}',
    )
    assert len(tls["certificate_chain"]) == 2
    key = curl(
        "-X",
        "POST",
        "http://dstack/GetKey",
        "-H",
        "Content-Type: application/json",
        "-d",
        '{"path": "my/key/path", "purpose": "signing"}',
    )
    assert key == curl("http://dstack/GetKey?path=my/key/path&purpose=signing")
    quote = curl(
        "-X",
        "POST",
        "http://dstack/GetQuote",
        "-H",
        "Content-Type: application/json",
        "-d",
        '{"report_data": "1234deadbeaf"}',
    )
    assert quote["report_data"].startswith("1234deadbeaf")
    assert curl(f"http://dstack/GetQuote?report_data={'00' * 64}")["report_data"] == "00" * 64
    assert curl("http://dstack/Info")["app_name"] == "simulator"


def test_restart_keeps_identity_and_keys(tmp_path):
    first = start_simulator(tmp_path, SEED)
    try:
        info1 = ok(first, "Info")
        key1 = ok(first, "GetKey", {"path": "p"})["key"]
        root1 = (tmp_path / "mock-root-ca.der").read_bytes()
    finally:
        first.stop()
    second = start_simulator(tmp_path)
    try:
        info2 = ok(second, "Info")
        assert (info2["app_id"], info2["instance_id"]) == (info1["app_id"], info1["instance_id"])
        assert ok(second, "GetKey", {"path": "p"})["key"] == key1
        assert (tmp_path / "mock-root-ca.der").read_bytes() == root1
    finally:
        second.stop()
    keys = tmp_path / ".appkeys.json"
    assert keys.stat().st_mode & 0o777 == 0o600


def test_sockets_are_owner_and_group_only(sim, tmp_path):
    for sock in (sim.dstack_sock, sim.tappd_sock):
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    group = grp.getgrgid(next(g.gr_gid for g in grp.getgrall() if g.gr_gid != os.getgid()))
    custom = start_simulator(
        tmp_path / "custom", SEED, ("--socket-mode", "0640", "--socket-group", group.gr_name)
    )
    try:
        for sock in (custom.dstack_sock, custom.tappd_sock):
            st = os.stat(sock)
            assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == group.gr_gid
        assert ok(custom, "Info")["app_id"] == ok(sim, "Info")["app_id"]
    finally:
        custom.stop()
    for bad, message in (("999", "not an octal number"), ("01777", "outside 0o777")):
        run = subprocess.run(
            [sys.executable, "-m", "pydstack.guest.simulator", "--dir", str(tmp_path / "x"),
             "--socket-mode", bad],
            capture_output=True,
            text=True,
        )  # fmt: skip
        assert run.returncode == 2 and message in run.stderr
