"""the mock pccs: dcap-qvl fetches collateral from it like from a real pccs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import dcap_qvl

from pydstack.attest.verify import CollateralCache, verify_quote
from pydstack.rpc.limits import ServerLimits
from pydstack.tee.collateral_server import start_server
from pydstack.tee.simulated import SimulatedTdx

from .slow_client import PATIENCE, closed_while, read_response, request

SEED = bytes.fromhex("42" * 32)


async def test_dcap_qvl_fetches_and_verifies():
    tdx = SimulatedTdx(SEED)
    runner, url = await start_server(tdx.collateral(), tdx.pki.platform.fmspc.hex())
    try:
        quote = tdx.get_quote(b"fetch me")
        col = await dcap_qvl.get_collateral(url, quote)
        report = dcap_qvl.verify_with_root_ca(quote, col, tdx.root_ca_der, int(time.time()))
        assert report.status == "UpToDate"
        cache = CollateralCache(url)
        first = await cache.get(quote, root_ca_der=tdx.root_ca_der)
        await cache.get(quote, root_ca_der=tdx.root_ca_der)
        assert cache.fetches == 1
        assert verify_quote(quote, first, root_ca_der=tdx.root_ca_der).status == "UpToDate"
    finally:
        await runner.cleanup()


def test_cli_serves_and_rejects_bad_seed(tmp_path):
    bad = subprocess.run(
        [sys.executable, "-m", "pydstack.tee.collateral_server", "--seed", "zz"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "invalid seed" in bad.stderr
    root = tmp_path / "root.der"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pydstack.tee.collateral_server",
            "--seed",
            SEED.hex(),
            "--listen",
            "127.0.0.1:0",
            "--root-out",
            str(root),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "serving mock pccs collateral" in line
        assert root.read_bytes() == SimulatedTdx(SEED).root_ca_der
    finally:
        proc.terminate()
        proc.wait(10)


async def test_slow_clients_are_cut_off():
    tdx = SimulatedTdx(SEED)
    limits = ServerLimits(header_timeout=0.5, idle_timeout=60)
    runner, url = await start_server(tdx.collateral(), tdx.pki.platform.fmspc.hex(), limits=limits)
    port = int(url.rsplit(":", 1)[1])
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = b"GET /sgx/certification/v4/rootcacrl HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100
        assert len(head) * 0.2 > PATIENCE
        assert await closed_while(reader, writer, [head[i : i + 1] for i in range(len(head))])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request("/sgx/certification/v4/rootcacrl", keep_alive=False))
        assert (await read_response(reader))[0] == 200
        writer.close()
    finally:
        await runner.cleanup()
