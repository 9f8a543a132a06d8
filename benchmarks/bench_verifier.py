"""dstack-verifier: `/verify` throughput next to raw dcap-qvl on the same quote with cached
collateral, and the time of a full `dstack-mr measure`.

* raw dcap-qvl: `dcap_qvl.verify_with_root_ca` on one simulated quote, collateral parsed once,
  back to back on one core;
* the verification core in process (DCAP with policy, RTMR3 replay, identity, OS image);
* `/verify` on dstack-verifier (one process, then `workers` = one per CPU) on loopback
  (collateral from a file, the sandbox image in its cache), CONCURRENCY connections from wrk
  (C, one thread) after a 1 s check that every answer is valid, the same attestation each
  time, and `GET /health` on the same server (what HTTP alone costs with the load generator on
  the same cores);
* `dstack-mr measure` (a process, as a user runs it) on a synthetic image of realistic size:
  4 MiB firmware with a 2 MiB extended BFV, a 16 MiB kernel, a 64 MiB initrd; with --cbor-out.

Prints numbers, asserts nothing. BENCH_SECONDS (default 3) per row, CONCURRENCY (default 8).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import dcap_qvl

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from common import rate, row

from pydstack.attest.attestation import encode_v0
from pydstack.attest.evidence import EvidenceVerifier
from pydstack.attest.verify import CollateralCache
from pydstack.devstack import free_port
from pydstack.mr.store import ImageStore
from pydstack.mr.verify import OsImageVerifier
from pydstack.tee.simulated import SimulatedTdx
from pydstack.vmm.backends.sandbox.image import ensure_sandbox_image
from tests.integration.kms_proc import _wait
from tests.unit.attest.test_evidence import SEED, attestation
from tests.unit.mr.synth import LAYOUT, Sec, firmware, image_dir, pe_kernel


def wrk_rate(url: str, body: bytes | None, seconds: float, conns: int, d: Path) -> float:
    """requests per second from wrk (C, one thread: not the bottleneck) at `conns`."""
    script = d / "wrk.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body.decode())}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        if body is not None
        else ""
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{max(1, int(seconds))}s", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise SystemExit(f"wrk saw {errors.group(1)} error answers from {url}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


async def http_rate(
    url: str, body: bytes | None, seconds: float, concurrency: int
) -> tuple[float, int]:
    """requests per second (POST `body`, or GET when None) and how many were not valid."""
    done = 0
    bad = 0
    end = time.perf_counter() + seconds
    async with aiohttp.ClientSession() as session:

        async def client() -> None:
            nonlocal done, bad
            while time.perf_counter() < end:
                if body is None:
                    async with session.get(url) as resp:
                        await resp.read()
                else:
                    async with session.post(url, data=body) as resp:
                        out = await resp.json()
                    bad += not out["is_valid"]
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return done / (time.perf_counter() - start), bad


def measure_image(d: Path) -> None:
    mib = 1 << 20
    layout = (
        Sec(0, 1, 0xFFE00000, 2 * mib, data_offset=2 * mib, raw_size=2 * mib),
        *LAYOUT[1:],
    )
    image_dir(
        d,
        fw=firmware(layout, size=4 * mib),
        kernel=pe_kernel(text=16 * mib),
        initrd=os.urandom(64 * mib),
    )
    cmd = [sys.executable, "-m", "pydstack.mr.cli", "measure", str(d), "-m", "4G", "--json"]
    for label, extra in [
        ("measure", []),
        ("measure --cbor-out", ["--cbor-out", str(d / "m.cbor")]),
    ]:
        t = time.perf_counter()
        subprocess.run([*cmd, *extra], check=True, capture_output=True)
        print(f"dstack-mr {label:<39} {time.perf_counter() - t:8.2f} s (process, 86 MiB image)")


def main() -> None:
    secs = float(os.environ.get("BENCH_SECONDS", "3"))
    concurrency = int(os.environ.get("CONCURRENCY", "8"))
    tdx = SimulatedTdx(SEED)
    att = attestation()
    col_json = tdx.collateral_json()
    now = int(time.time())
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ensure_sandbox_image(d / "images")
        (d / "collateral.json").write_text(col_json)
        (d / "root.der").write_bytes(tdx.root_ca_der)
        port = free_port()
        (d / "verifier.toml").write_text(
            f'address = "127.0.0.1"\nport = {port}\nimage_cache_dir = "{d / "images"}"\n'
            'image_download_url = ""\n[attestation]\ninsecure_allow_external_trust_anchors = true\n'
            f'collateral_files = ["{d / "collateral.json"}"]\n[attestation.urls]\npccs = ""\n'
            f'[attestation.root_ca]\ntdx = "{d / "root.der"}"\n'
        )
        print(f"# verifier, {secs:.0f} s per row, {os.cpu_count()} cores", flush=True)
        col = dcap_qvl.QuoteCollateralV3.from_json(col_json)
        raw, lat = rate(
            lambda: dcap_qvl.verify_with_root_ca(att.quote, col, tdx.root_ca_der, now), secs
        )
        print(row("raw dcap-qvl verify_with_root_ca (one core)", raw, lat), flush=True)

        cache = CollateralCache(None)
        cache.load_file(d / "collateral.json")
        core = EvidenceVerifier(
            cache,
            root_ca_der=tdx.root_ca_der,
            images=OsImageVerifier(ImageStore(d / "images")),
        )
        loop = asyncio.new_event_loop()
        assert loop.run_until_complete(core.verify(att)).is_valid
        per_s, lat = rate(lambda: loop.run_until_complete(core.verify(att)), secs)
        loop.close()
        print(row("verification core in process (all checks)", per_s, lat), flush=True)

        config = (d / "verifier.toml").read_text()
        for workers in (1, os.cpu_count() or 1):
            (d / "verifier.toml").write_text(f"workers = {workers}\n" + config)
            proc = subprocess.Popen(
                [sys.executable, "-m", "pydstack.verifier.main", "-c", str(d / "verifier.toml")],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            try:
                line = _wait(proc, "listening on")
                base = next(w for w in line.split() if w.startswith("http://"))
                url = base + "/verify"
                body = json.dumps({"attestation": encode_v0(att).hex()}).encode()
                # every answer checked for a short while, then the rates from wrk
                _, bad = asyncio.run(http_rate(url, body, 1.0, concurrency))
                http = wrk_rate(url, body, secs, concurrency, d)
                health = wrk_rate(base + "/health", None, secs, concurrency, d)
            finally:
                proc.terminate()
                proc.communicate(timeout=20)
            label = f"/verify over http, {concurrency} conns, {workers} process(es)"
            print(
                f"{label:<48} {http:>10.1f}/s   {http / raw:.2f}x raw dcap-qvl"
                f"   (wrk; invalid answers in a 1 s check: {bad})",
                flush=True,
            )
            print(f"{'  GET /health (the http floor)':<48} {health:>10.1f}/s", flush=True)
            if workers == 1 and (os.cpu_count() or 1) == 1:
                break
        measure_image(d / "image")


if __name__ == "__main__":
    main()
