"""onboard mode: the setup page and Onboard service of a kms without keys, then the main
service after Finish."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import httpx
from google.protobuf.empty_pb2 import Empty

from pydstack.attest.attestation import decode_versioned
from pydstack.attest.identity import AppInfo
from pydstack.crypto.certs import spki_der
from pydstack.kms.keys import KeyStore
from pydstack.kms.onboard_server import keys_report_data
from pydstack.rpc.client import PrpcClient
from pydstack.rpc.proto import kms_rpc_pb2 as pb

from .kms_proc import OS_IMAGE, SEED, Pccs, _wait, allowlist, free_port, write_config
from .simulator_proc import start_simulator


def test_onboard_mode_bootstrap_then_serve(tmp_path):
    pccs = Pccs(tmp_path / "root.der")
    sim = start_simulator(tmp_path / "agent", SEED.hex())
    proc = None
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sim.dstack_sock))) as c:
            att = bytes.fromhex(
                c.post("http://localhost/Attest", json={"report_data": "00" * 64}).json()[
                    "attestation"
                ]
            )
        mr = AppInfo.from_attestation(decode_versioned(att), boottime_mr=False).mr_aggregated
        allow = tmp_path / "allow.json"
        allowlist(
            allow,
            os_images=[hashlib.sha256(OS_IMAGE.encode()).hexdigest()],
            apps={},
            kms={"mrAggregated": ["0x" + mr.hex()], "allowAnyDevice": True},
        )
        cfg = write_config(tmp_path, pccs.url, tmp_path / "root.der", allow, agent=sim.dstack_sock)
        port = free_port()
        cfg.write_text(
            cfg.read_text().replace(
                'auto_bootstrap_domain = "kms.local"', f'address = "127.0.0.1"\nport = {port}'
            )
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "pydstack.kms.main", "-c", str(cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait(proc, "onboard mode on")
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as c:
            page = c.get("/")
            assert page.status_code == 200 and "<title>dstack KMS Setup</title>" in page.text
            info = c.post("/prpc/Onboard.GetAttestationInfo?json", json={}).json()
            assert info["mr_aggregated"] == mr.hex() and info["tee_variant"] == "dstack-tdx"
            bad = c.post("/prpc/Onboard.Bootstrap?json", json={"domain": "-bad-.x"})
            assert bad.status_code == 400 and bad.json()["error"] == "invalid domain"
            boot = c.post("/prpc/Onboard.Bootstrap?json", json={"domain": "kms.test"})
            assert boot.status_code == 200, boot.text
            r = boot.json()
            again = c.post("/prpc/Onboard.Bootstrap?json", json={"domain": "kms.test"})
            assert again.json()["error"] == "KMS has already been bootstrapped"
            assert c.get("/finish").text == "OK"
        line = _wait(proc, "listening on")
        keys = KeyStore(tmp_path / "certs").load()
        ca_spki = spki_der(keys.root_ca_cert.public_key())
        assert r["ca_pubkey"] == ca_spki.hex() and r["k256_pubkey"] == keys.k256_pubkey.hex()
        bootstrap_att = decode_versioned(bytes.fromhex(r["attestation"]))
        assert bootstrap_att.report_data == keys_report_data(ca_spki, keys.k256_pubkey)

        async def meta() -> pb.GetMetaResponse:
            async with PrpcClient(
                line.split()[-1], prefix="/prpc", verify_server=lambda c: None
            ) as c:
                return await c.call("GetMeta", Empty(), pb.GetMetaResponse)

        import asyncio

        m = asyncio.run(meta())
        assert m.bootstrap_info.k256_pubkey == keys.k256_pubkey
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        sim.stop()
        pccs.stop()
