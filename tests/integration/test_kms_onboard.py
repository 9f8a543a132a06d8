"""replication: a second kms gets the root keys over mutually attested tls, then both derive
the same app keys; kms self-authorization and attested rpc certificates on the way."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from pydstack.attest.attestation import decode_versioned
from pydstack.attest.identity import AppInfo
from pydstack.guest.kms_client import get_app_keys
from pydstack.kms.keys import KeyStore
from pydstack.rpc.server import RpcError

from .kms_proc import OS_IMAGE, SEED, Pccs, allowlist, start_kms, write_config
from .simulator_proc import start_simulator
from .test_kms_keys import COMPOSE, VM_CONFIG, App


def kms_mr(sock) -> str:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=30) as c:
        att = bytes.fromhex(
            c.post("http://localhost/Attest", json={"report_data": "00" * 64}).json()["attestation"]
        )
    return (
        "0x"
        + AppInfo.from_attestation(decode_versioned(att), boottime_mr=False).mr_aggregated.hex()
    )


@pytest.mark.parametrize("allow_replica", [True, False])
async def test_onboarded_replica_derives_the_same_keys(tmp_path, allow_replica):
    pccs = Pccs(tmp_path / "root.der")
    sim_a = start_simulator(tmp_path / "agent-a", SEED.hex())
    sim_b = start_simulator(tmp_path / "agent-b", SEED.hex())
    procs = []
    try:
        compose_hash = hashlib.sha256(COMPOSE).hexdigest()
        mrs = [kms_mr(sim_a.dstack_sock)] + ([kms_mr(sim_b.dstack_sock)] if allow_replica else [])
        allow = tmp_path / "allow.json"
        allowlist(
            allow,
            os_images=[hashlib.sha256(OS_IMAGE.encode()).hexdigest()],
            apps={compose_hash[:40]: {"composeHashes": [compose_hash], "allowAnyDevice": True}},
            kms={"mrAggregated": mrs, "allowAnyDevice": True},
        )
        (tmp_path / "a").mkdir()
        cfg_a = write_config(
            tmp_path / "a", pccs.url, tmp_path / "root.der", allow, agent=sim_a.dstack_sock
        )
        kms_a = start_kms(cfg_a)
        procs.append(kms_a)
        (tmp_path / "b").mkdir()
        cfg_b = write_config(
            tmp_path / "b",
            pccs.url,
            tmp_path / "root.der",
            allow,
            agent=sim_b.dstack_sock,
            source_url=kms_a.url,
        )
        if not allow_replica:
            import subprocess
            import sys

            out = subprocess.run(
                [sys.executable, "-m", "pydstack.kms.main", "-c", str(cfg_b)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert out.returncode == 2
            assert "KMS is not allowed: aggregated MR not allowed" in out.stderr
            assert not (tmp_path / "b/certs/root-k256.key").exists()
            return
        kms_b = start_kms(cfg_b)
        procs.append(kms_b)
        a, b = KeyStore(tmp_path / "a/certs").load(), KeyStore(tmp_path / "b/certs").load()
        assert a.root_k256 == b.root_k256
        assert a.rpc_cert.public_key() != b.rpc_cert.public_key()
        keys_a, _ = await get_app_keys(kms_a.url, App().attest, VM_CONFIG)
        keys_b, _ = await get_app_keys(kms_b.url, App().attest, VM_CONFIG)
        assert (keys_a.k256_key, keys_a.env_crypt_key, keys_a.disk_crypt_key) == (
            keys_b.k256_key,
            keys_b.env_crypt_key,
            keys_b.disk_crypt_key,
        )
        # an app not in the allowlist is still refused by the replica
        with pytest.raises(RpcError, match="app not registered"):
            await get_app_keys(kms_b.url, App(compose=b"{}").attest, VM_CONFIG)
        assert json.loads(allow.read_text())["kms"]["mrAggregated"] == mrs
    finally:
        for p in procs:
            p.stop()
        sim_a.stop()
        sim_b.stop()
        pccs.stop()
