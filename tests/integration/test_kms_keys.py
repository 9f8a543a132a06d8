"""dstack-kms: only attested, authorized code gets an app's keys (real processes, RA-TLS)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from google.protobuf.empty_pb2 import Empty

from pydstack.attest.attestation import Attestation, stripped, to_versioned_bytes
from pydstack.attest.report_data import ratls_report_data
from pydstack.crypto.certs import (
    CertRequest,
    cert_pem,
    generate_p256_key,
    issue_cert,
    key_pem,
    load_cert_pem,
    load_key_pem,
    spki_der,
)
from pydstack.crypto.k256 import compressed_pubkey, keccak256, recover_pubkey
from pydstack.guest.instance import InstanceInfo
from pydstack.guest.kms_client import get_app_keys
from pydstack.guest.measure import measure_stage1
from pydstack.kms.derive import derive_app_keys
from pydstack.kms.keys import KeyStore
from pydstack.rpc.client import PrpcClient
from pydstack.rpc.proto import kms_rpc_pb2 as pb
from pydstack.rpc.server import RpcError
from pydstack.sdk import verify_env_encrypt_public_key
from pydstack.tee.simulated import SimulatedTdx

from .kms_proc import OS_IMAGE, SEED, Pccs, allowlist, start_kms, write_config

COMPOSE = b'{"manifest_version":2,"name":"kms-test","runner":"docker-compose"}'
VM_CONFIG = json.dumps({"os_image_hash": hashlib.sha256(OS_IMAGE.encode()).hexdigest()})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("kms")
    pccs = Pccs(d / "root.der")
    allow = d / "allow.json"
    compose_hash = hashlib.sha256(COMPOSE).hexdigest()
    allowlist(
        allow,
        os_images=[VM_CONFIG and json.loads(VM_CONFIG)["os_image_hash"]],
        apps={compose_hash[:40]: {"composeHashes": [compose_hash], "allowAnyDevice": True}},
    )
    cfg = write_config(d, pccs.url, d / "root.der", allow)
    kms = start_kms(cfg)
    state = {"dir": d, "kms": kms, "allow": allow, "pccs": pccs, "compose_hash": compose_hash}
    yield state
    state["kms"].stop()  # a test restarts it: stop the one running now
    pccs.stop()


class App:
    """a simulated cvm that measured an app and attests keys for ra-tls."""

    def __init__(
        self, compose: bytes = COMPOSE, seed: bytes = SEED, info: InstanceInfo | None = None
    ):
        self.tdx = SimulatedTdx(seed, os_image=OS_IMAGE)
        self.identity = measure_stage1(self.tdx, compose, info or InstanceInfo(b"\x01" * 20))
        self.tamper = False

    def attest(self, spki: bytes) -> bytes:
        rd = ratls_report_data(spki)
        att = Attestation(
            self.tdx.get_quote(rd),
            tuple(self.tdx.event_log()),
            tuple(self.tdx.runtime_events()),
            rd,
            VM_CONFIG,
        )
        if self.tamper:
            att = dataclasses.replace(att, runtime_events=att.runtime_events[:-1])
        return to_versioned_bytes(stripped(att))


def _root(env):
    return KeyStore(env["dir"] / "certs").load()


async def test_allowed_app_gets_the_derived_keys(env):
    app = App()
    keys, ca_spki = await get_app_keys(env["kms"].url, app.attest, VM_CONFIG)
    root = _root(env)
    expected = derive_app_keys(
        root.root_ca_key, root.root_k256, app.identity.app_id, app.identity.instance_id
    )
    assert keys.k256_key == expected.k256_key
    assert keys.disk_crypt_key == expected.disk_crypt_key
    assert keys.env_crypt_key == expected.env_crypt_key
    assert keys.gateway_app_id == "gw-test"
    assert ca_spki == spki_der(root.root_ca_cert.public_key())
    signer = recover_pubkey(
        keccak256(b"dstack-kms-issued:" + app.identity.app_id + compressed_pubkey(keys.k256_key)),
        keys.k256_signature,
    )
    assert signer == root.k256_pubkey
    assert (env["dir"] / "certs/root-k256.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unregistered", "Boot denied: app not registered"),
        ("compose_removed", "Boot denied: compose hash not allowed"),
        ("os_image", "Boot denied: OS image is not allowed"),
        ("untrusted_root", "attestation refused: quote verification failed"),
        ("rtmr3", "attestation refused: rtmr3 replay mismatch"),
        ("device", "Boot denied: app is not allowed to boot on this device"),
        ("tcb", "Boot denied: TCB status is not allowed"),
    ],
)
async def test_denials_with_reasons(env, case, reason):
    app = App()
    vm_config = VM_CONFIG
    original = env["allow"].read_text()
    try:
        if case == "unregistered":
            app = App(compose=COMPOSE + b" ")
        elif case == "compose_removed":
            doc = json.loads(original)
            doc["apps"][env["compose_hash"][:40]]["composeHashes"] = []
            env["allow"].write_text(json.dumps(doc))
        elif case == "os_image":
            vm_config = json.dumps({"os_image_hash": "ab" * 32})
        elif case == "untrusted_root":
            app = App(seed=bytes(32))
        elif case == "rtmr3":
            app.tamper = True
        elif case in ("device", "tcb"):
            doc = json.loads(original)
            if case == "device":
                rule = doc["apps"][env["compose_hash"][:40]]
                rule["allowAnyDevice"], rule["devices"] = False, ["0x" + "00" * 32]
            else:
                doc["allowedTcbStatuses"] = ["OutOfDate"]
            env["allow"].write_text(json.dumps(doc))
        with pytest.raises(RpcError) as err:
            await get_app_keys(env["kms"].url, app.attest, vm_config)
        assert str(err.value).startswith(reason), str(err.value)
    finally:
        env["allow"].write_text(original)


async def test_certificate_binding_and_missing_attestation(env):
    app = App()
    url = env["kms"].url
    async with PrpcClient(url, prefix="/prpc", verify_server=lambda c: None) as plain:
        tmp = await plain.call("GetTempCaCert", Empty(), pb.GetTempCaCertResponse)
        with pytest.raises(RpcError, match="No attestation provided"):
            await plain.call("GetAppKey", pb.GetAppKeyRequest(api_version=1), pb.AppKeyResponse)
        with pytest.raises(RpcError, match="app_id must be 20 bytes"):
            await plain.call(
                "GetAppEnvEncryptPubKey", pb.AppId(app_id=b"abc"), pb.PublicKeyResponse
            )
        with pytest.raises(RpcError, match="unsupported api version"):
            await plain.call("GetAppKey", pb.GetAppKeyRequest(api_version=7), pb.AppKeyResponse)
    key, other = generate_p256_key(), generate_p256_key()
    cert = issue_cert(
        CertRequest("RA-TLS TEMP Cert", attestation=app.attest(spki_der(other.public_key()))),
        key.public_key(),
        load_key_pem(tmp.temp_ca_key),
        load_cert_pem(tmp.temp_ca_cert),
    )
    async with PrpcClient(
        url,
        prefix="/prpc",
        client_cert_pem=cert_pem(cert),
        client_key_pem=key_pem(key),
        verify_server=lambda c: None,
    ) as mtls:
        with pytest.raises(RpcError, match="not bound to its quote"):
            await mtls.call(
                "GetAppKey",
                pb.GetAppKeyRequest(api_version=1, vm_config=VM_CONFIG),
                pb.AppKeyResponse,
            )


async def test_env_pubkey_and_meta(env):
    app_id = bytes.fromhex(env["compose_hash"][:40])
    async with PrpcClient(env["kms"].url, prefix="/prpc", verify_server=lambda c: None) as c:
        r = await c.call("GetAppEnvEncryptPubKey", pb.AppId(app_id=app_id), pb.PublicKeyResponse)
        meta = await c.call("GetMeta", Empty(), pb.GetMetaResponse)
    root = _root(env)
    assert meta.k256_pubkey == root.k256_pubkey and not meta.is_dev
    assert meta.gateway_app_id == "gw-test"
    signer = verify_env_encrypt_public_key(r.public_key, r.signature_v1, app_id, r.timestamp)
    assert signer == "0x" + root.k256_pubkey.hex()
    expected = derive_app_keys(root.root_ca_key, root.root_k256, app_id, b"")
    from pydstack.crypto.envcrypt import x25519_public

    assert r.public_key == x25519_public(expected.env_crypt_key)


async def test_same_keys_after_restart(env):
    app = App()
    first, _ = await get_app_keys(env["kms"].url, app.attest, VM_CONFIG)
    env["kms"].stop()
    from .kms_proc import start_kms as restart

    env["kms"] = restart(env["kms"].config)
    second, _ = await get_app_keys(env["kms"].url, App().attest, VM_CONFIG)
    assert (first.k256_key, first.disk_crypt_key, first.env_crypt_key) == (
        second.k256_key,
        second.disk_crypt_key,
        second.env_crypt_key,
    )


async def test_official_sdk_env_encryption_and_signature(env, tmp_path):
    """the official sdk verifies the kms's env-key signature and its ciphertext decrypts."""
    import subprocess

    from pydstack.crypto.envcrypt import decrypt_env

    from .official_sdk import python_sdk

    app_id = bytes.fromhex(env["compose_hash"][:40])
    async with PrpcClient(env["kms"].url, prefix="/prpc", verify_server=lambda c: None) as c:
        r = await c.call("GetAppEnvEncryptPubKey", pb.AppId(app_id=app_id), pb.PublicKeyResponse)
    py, _ = python_sdk()
    script = (
        "import sys\n"
        "from dstack_sdk import verify_env_encrypt_public_key, encrypt_env_vars_sync, EnvVar\n"
        "pub, sig, app, ts = sys.argv[1:5]\n"
        "raw = bytes.fromhex(pub)\n"
        "print(verify_env_encrypt_public_key(raw, bytes.fromhex(sig), app, int(ts)))\n"
        "print(encrypt_env_vars_sync([EnvVar(key='SECRET', value='s3cr3t')], pub))\n"
    )
    out = subprocess.run(
        [
            str(py),
            "-c",
            script,
            r.public_key.hex(),
            r.signature_v1.hex(),
            app_id.hex(),
            str(r.timestamp),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    root = _root(env)
    assert out[0].removeprefix("0x") == root.k256_pubkey.hex()
    env_key = derive_app_keys(root.root_ca_key, root.root_k256, app_id, b"").env_crypt_key
    assert decrypt_env(env_key, bytes.fromhex(out[1])) == [("SECRET", "s3cr3t")]


async def test_sign_cert(env):
    from cryptography import x509

    from pydstack.attest.ratls import parse_ratls_cert
    from pydstack.crypto.csr import CONFIRM, CertConfigV2, CertSigningRequestV2

    app = App()
    key = generate_p256_key()
    spki = spki_der(key.public_key())
    csr = CertSigningRequestV2(
        CONFIRM,
        spki,
        CertConfigV2(None, "app.example", ("app.example",), True, False, ext_quote=True),
        app.attest(spki),
    )
    assert CertSigningRequestV2.decode(csr.encode()) == csr
    req = pb.SignCertRequest(
        api_version=2, csr=csr.encode(), signature=csr.sign(key), vm_config=VM_CONFIG
    )
    async with PrpcClient(env["kms"].url, prefix="/prpc", verify_server=lambda c: None) as c:
        resp = await c.call("SignCert", req, pb.SignCertResponse)
        leaf, app_ca_cert, root = (
            x509.load_pem_x509_certificate(p.encode()) for p in resp.certificate_chain
        )
        info = parse_ratls_cert(leaf)
        assert info.app_id == app.identity.app_id and info.special_usage == "app:custom"
        assert info.attestation == csr.attestation
        assert leaf.issuer == app_ca_cert.subject and app_ca_cert.issuer == root.subject
        assert parse_ratls_cert(app_ca_cert).special_usage == "app:ca"
        bad = pb.SignCertRequest(
            api_version=2, csr=csr.encode(), signature=csr.sign(generate_p256_key())
        )
        with pytest.raises(RpcError, match="invalid csr: csr signature is invalid"):
            await c.call("SignCert", bad, pb.SignCertResponse)
        with pytest.raises(RpcError, match="only 2"):
            await c.call("SignCert", pb.SignCertRequest(api_version=1), pb.SignCertResponse)


async def test_simulated_quote_refused_without_the_mock_root(env, tmp_path):
    """the same kms configured without the mock trust anchor (intel's root) refuses the cvm."""
    from .kms_proc import start_kms as launch

    text = env["kms"].config.read_text()
    text = text.replace("insecure_allow_external_trust_anchors = true", "")
    text = (
        text.split("[core.attestation.root_ca]")[0]
        + "[core.auth_api]"
        + text.split("[core.auth_api]")[1]
    )
    import re

    from .kms_proc import free_port

    text = re.sub(r"port = \d+", f"port = {free_port()}", text, count=1)
    cfg = tmp_path / "kms.toml"
    cfg.write_text(text)
    kms = launch(cfg)
    try:
        with pytest.raises(RpcError, match="attestation refused: quote verification failed"):
            await get_app_keys(kms.url, App().attest, VM_CONFIG)
    finally:
        kms.stop()


async def test_health_and_metrics(env):
    import httpx

    def metrics() -> dict[str, int]:
        with httpx.Client(base_url=env["kms"].url, verify=False, timeout=30) as c:
            assert c.get("/health").text == "OK"
            text = c.get("/metrics").text
        pairs = (line.split() for line in text.splitlines() if not line.startswith("#"))
        return {k: int(v) for k, v in pairs}

    before = metrics()
    async with PrpcClient(env["kms"].url, prefix="/prpc", verify_server=lambda c: None) as c:
        with pytest.raises(RpcError):
            await c.call("GetAppKey", pb.GetAppKeyRequest(api_version=1), pb.AppKeyResponse)
    await get_app_keys(env["kms"].url, App().attest, VM_CONFIG)
    after = metrics()
    assert (
        after["dstack_kms_attestation_requests_total"]
        == before["dstack_kms_attestation_requests_total"] + 2
    )
    assert (
        after["dstack_kms_attestation_failures_total"]
        == before["dstack_kms_attestation_failures_total"] + 1
    )


async def test_a_dead_auth_api_is_not_described_to_callers(env, tmp_path):
    """with the webhook down, callers learn that it failed, not where it lives."""
    import re

    from .kms_proc import free_port
    from .kms_proc import start_kms as launch

    dead = free_port()
    text = env["kms"].config.read_text()
    text = text.replace('type = "simple"', 'type = "webhook"')
    text = text.replace(
        "[core.auth_api.simple]",
        f'[core.auth_api.webhook]\nurl = "http://127.0.0.1:{dead}"\n\n[core.auth_api.simple]',
    )
    text = re.sub(r"port = \d+", f"port = {free_port()}", text, count=1)
    cfg = tmp_path / "kms.toml"
    cfg.write_text(text)
    kms = launch(cfg)
    try:
        with pytest.raises(RpcError) as denied:
            await get_app_keys(kms.url, App().attest, VM_CONFIG)
        assert str(denied.value) == "Boot denied: auth api unavailable"
        async with PrpcClient(kms.url, prefix="/prpc", verify_server=lambda c: None) as c:
            with pytest.raises(RpcError) as meta:
                await c.call("GetMeta", Empty(), pb.GetMetaResponse)
        assert str(meta.value) == "auth api info failed"
    finally:
        kms.stop()


async def test_a_stale_temp_ca_is_refreshed_once(env):
    """the guest keeps each kms's temp ca; one the kms no longer trusts (a replaced kms) is
    asked for again, once, and the keys still come."""
    from pydstack.crypto.certs import CertRequest, cert_pem, generate_p256_key, issue_cert, key_pem
    from pydstack.guest import kms_client
    from pydstack.rpc.proto import kms_rpc_pb2 as pb

    url = env["kms"].url
    base = kms_client._prpc_url(url)
    stale_key = generate_p256_key()
    stale = issue_cert(CertRequest("stale temp ca", ca_level=1), stale_key.public_key(), stale_key)
    kms_client._TEMP_CA[base] = pb.GetTempCaCertResponse(
        temp_ca_cert=cert_pem(stale), temp_ca_key=key_pem(stale_key)
    )
    keys, _ = await get_app_keys(url, App().attest, VM_CONFIG)
    assert keys.k256_key
    assert kms_client._TEMP_CA[base].temp_ca_cert != cert_pem(stale)
