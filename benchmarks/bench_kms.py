"""GetAppKey end to end (RA-TLS handshake, quote verification, auth, derivation) per second with
p50/p99 under `dev` and `eth` auth, and where the time goes (in-process step timings).

Starts a mock PCCS, dstack-kms (and anvil for eth) as separate processes on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from common import pct

from pydstack.attest.attestation import decode_versioned
from pydstack.attest.ratls import verify_cert_binding
from pydstack.attest.verify import CollateralCache
from pydstack.crypto.certs import CertRequest, generate_p256_key, issue_cert, spki_der
from pydstack.guest.instance import InstanceInfo
from pydstack.guest.kms_client import get_app_keys
from pydstack.kms.anvil import DEV_PRIVATE_KEY, Anvil
from pydstack.kms.attestation import AttestationChecker
from pydstack.kms.auth import DevAuth, EthAuth
from pydstack.kms.chain import Chain, KmsContract
from pydstack.kms.derive import derive_app_keys
from pydstack.kms.keys import KeyStore
from tests.integration.kms_proc import Pccs, allowlist, start_kms, write_config
from tests.integration.test_kms_keys import VM_CONFIG, App


async def e2e(url: str, seconds: float, label: str) -> None:
    app = App()
    lat: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        await get_app_keys(url, app.attest, VM_CONFIG)
        lat.append(time.perf_counter() - t)
    print(
        f"GetAppKey e2e [{label:>4}]  {len(lat) / sum(lat):7.1f}/s"
        f"   p50 {pct(lat, 50) * 1e3:7.2f} ms"
        f"   p99 {pct(lat, 99) * 1e3:7.2f} ms   n={len(lat)}",
        flush=True,
    )


def _client_proc(args: tuple[str, float, int, bool]) -> list[float]:
    """one load-generating process: `conc` CVMs asking for their keys back to back."""
    url, seconds, conc, pinned_app = args
    import logging

    logging.disable(logging.WARNING)

    async def run() -> list[float]:
        lat: list[float] = []
        end = time.perf_counter() + seconds

        async def one() -> None:
            app = App(info=_pinned()) if pinned_app else App()
            while time.perf_counter() < end:
                t = time.perf_counter()
                await get_app_keys(url, app.attest, VM_CONFIG)
                lat.append(time.perf_counter() - t)

        await asyncio.gather(*(one() for _ in range(conc)))
        return lat

    return asyncio.run(run())


def _pinned() -> InstanceInfo:
    return InstanceInfo(b"\x01" * 20, b"", bytes.fromhex(os.environ["BENCH_ETH_APP"][2:]))


def concurrent(url: str, seconds: float, label: str, procs: int = 3, conc: int = 8) -> None:
    """many CVMs at once: `procs` client processes of `conc` concurrent callers each (the
    clients' quote and TLS work spread over processes, so the KMS is what saturates)."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(procs) as pool:
        t0 = time.perf_counter()
        parts = pool.map(_client_proc, [(url, seconds, conc, label == "eth")] * procs)
        wall = time.perf_counter() - t0
    lat = [x for p in parts for x in p]
    print(
        f"GetAppKey {procs * conc:>2} clients [{label:>4}]  {len(lat) / wall:7.1f}/s"
        f"   p50 {pct(lat, 50) * 1e3:7.2f} ms"
        f"   p99 {pct(lat, 99) * 1e3:7.2f} ms   n={len(lat)}",
        flush=True,
    )


async def steps(
    pccs_url: str, root: bytes, certs: Path, auths: dict[str, object], n: int = 200
) -> None:
    app = App()
    checker = AttestationChecker(CollateralCache(pccs_url), root)
    keys = KeyStore(certs).load()
    key = generate_p256_key()
    att_bytes = app.attest(spki_der(key.public_key()))
    cert = issue_cert(CertRequest("RA-TLS TEMP Cert", attestation=att_bytes), key.public_key(), key)
    await checker.boot_info(decode_versioned(att_bytes))  # warm the collateral cache
    timings: dict[str, list[float]] = {}

    def rec(name: str, t0: float) -> None:
        timings.setdefault(name, []).append(time.perf_counter() - t0)

    for _ in range(n):
        t = time.perf_counter()
        app.attest(spki_der(key.public_key()))
        rec("guest: quote + attestation", t)
        t = time.perf_counter()
        att = verify_cert_binding(cert)
        rec("kms: cert parse + binding", t)
        t = time.perf_counter()
        boot = await checker.boot_info(att, vm_config=VM_CONFIG)
        rec("kms: dcap verify + replay + identity", t)
        for name, auth in auths.items():
            t = time.perf_counter()
            await auth.is_app_allowed(boot)  # type: ignore[attr-defined]
            rec(f"kms: auth ({name})", t)
        t = time.perf_counter()
        derive_app_keys(keys.root_ca_key, keys.root_k256, boot.app_id, boot.instance_id)
        rec("kms: key derivation", t)
    total = sum(sum(v) for k, v in timings.items() if "auth (eth)" not in k)
    print(f"# step timings (in-process, mean over {n}), share of the dev-auth path")
    floor = sum(sum(v) for k, v in timings.items() if k.startswith("kms:") and "eth" not in k) / n
    print(f"  server-side floor (dev): {floor * 1e3:.2f} ms/request = {1 / floor:.0f}/s per core")
    for name, vals in timings.items():
        mean = sum(vals) / len(vals)
        share = "" if "eth" in name else f"{100 * sum(vals) / total:5.1f}%"
        print(f"  {name:<40} {mean * 1e3:8.3f} ms  {share}")


async def main() -> None:
    secs = float(os.environ.get("BENCH_SECONDS", "5"))
    import logging

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pccs = Pccs(tmp / "root.der")
        node = Anvil().start()
        procs = []
        try:
            allow = tmp / "allow.json"
            allowlist(allow, os_images=[], apps={})
            dev_dir = tmp / "dev"
            dev_dir.mkdir()
            cfg = write_config(dev_dir, pccs.url, tmp / "root.der", allow)
            cfg.write_text(cfg.read_text().replace('type = "simple"', 'type = "dev"'))
            kms_dev = start_kms(cfg)
            procs.append(kms_dev)
            chain = Chain.connect(node.url, node.chain_id, DEV_PRIVATE_KEY)
            kms = KmsContract(chain, chain.deploy_kms())
            kms.call("addOsImageHash", bytes.fromhex(json.loads(VM_CONFIG)["os_image_hash"]))
            contract_app = kms.deploy_and_register_app(compose_hash=App().identity.compose_hash)
            pinned = InstanceInfo(b"\x01" * 20, b"", bytes.fromhex(contract_app[2:]))
            kms.app_call(contract_app, "addComposeHash", App(info=pinned).identity.compose_hash)
            eth_dir = tmp / "eth"
            eth_dir.mkdir()
            cfg = write_config(eth_dir, pccs.url, tmp / "root.der", allow)
            cfg.write_text(
                cfg.read_text()
                .replace('type = "simple"', 'type = "eth"')
                .replace(
                    "[core.auth_api.simple]",
                    f'[core.auth_api.eth]\nrpc_url = "{node.url}"\nkms_contract = "{kms.address}"\n'
                    f"chain_id = {node.chain_id}\n\n[core.auth_api.simple]",
                )
            )
            kms_eth = start_kms(cfg)
            procs.append(kms_eth)
            print(f"# dstack-kms GetAppKey, {secs:.0f} s per row, one client, new tls per call")
            await e2e(kms_dev.url, secs, "dev")
            import tests.integration.test_kms_keys as t

            orig = t.App.__init__

            def pinned_init(self, *a, **kw):  # type: ignore[no-untyped-def]
                kw.setdefault("info", pinned)
                orig(self, *a, **kw)

            t.App.__init__ = pinned_init  # type: ignore[method-assign]
            await e2e(kms_eth.url, secs, "eth")
            t.App.__init__ = orig  # type: ignore[method-assign]
            os.environ["BENCH_ETH_APP"] = contract_app
            print(f"# many cvms at once ({secs:.0f} s per row)")
            concurrent(kms_dev.url, secs, "dev")
            concurrent(kms_eth.url, secs, "eth")
            auths = {"dev": DevAuth(), "eth": EthAuth(node.url, kms.address, node.chain_id)}
            try:
                await steps(pccs.url, (tmp / "root.der").read_bytes(), dev_dir / "certs", auths)
            finally:
                await auths["eth"].close()
        finally:
            for p in procs:
                p.stop()
            node.stop()
            pccs.stop()


if __name__ == "__main__":
    asyncio.run(main())
