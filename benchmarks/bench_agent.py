"""guest agent requests per second and latency over its unix socket.

GetKey, GetQuote and Info against `dstack-simulator` at 1 and 32 concurrent clients, next to a
trivial prpc method on the same HTTP stack (the floor: what the transport alone costs). Server
processes run separately from the load generator.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))
from common import pct

HERE = Path(__file__).parent


async def load(
    label: str, sock: str, method: str, body: bytes, conc: int, seconds: float
) -> tuple[int, list[float]]:
    lat: list[float] = []
    end = time.perf_counter() + seconds
    errors = 0

    async def worker() -> None:
        nonlocal errors
        conn = aiohttp.UnixConnector(path=sock, limit=1)
        async with aiohttp.ClientSession(connector=conn) as s:
            while time.perf_counter() < end:
                t = time.perf_counter()
                async with s.post(
                    f"http://localhost/{method}",
                    data=body,
                    headers={"Content-Type": "application/json"},
                ) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                lat.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    elapsed = time.perf_counter() - start
    print(
        f"{label:<8} {method:<10} conc {conc:>3}  {len(lat) / elapsed:9.1f} req/s   "
        f"p50 {pct(lat, 50) * 1e3:7.2f} ms   p99 {pct(lat, 99) * 1e3:7.2f} ms   errors {errors}",
        flush=True,
    )
    return errors, lat


def start(cmd: list[str], ready: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if ready in line:
            return proc
    raise RuntimeError(f"{cmd[2]} did not start")


async def main() -> None:
    secs = float(os.environ.get("BENCH_SECONDS", "3"))
    with tempfile.TemporaryDirectory() as d:
        sim = start(
            [sys.executable, "-m", "pydstack.guest.simulator", "--dir", f"{d}/sim"], "export TAPPD"
        )
        triv = start([sys.executable, str(HERE / "trivial_server.py"), f"{d}/t.sock"], "ready")
        try:
            print(f"# unix socket, json mode, {secs:.0f} s per row, server and client processes")
            for conc in (1, 32):
                await load("trivial", f"{d}/t.sock", "Version", b"{}", conc, secs)
                await load("agent", f"{d}/sim/dstack.sock", "Version", b"{}", conc, secs)
                await load(
                    "agent", f"{d}/sim/dstack.sock", "GetKey", b'{"path":"/bench"}', conc, secs
                )
                await load(
                    "agent", f"{d}/sim/dstack.sock", "GetQuote", b'{"report_data":"01"}', conc, secs
                )
                await load("agent", f"{d}/sim/dstack.sock", "Info", b"{}", conc, secs)
        finally:
            for p in (sim, triv):
                p.terminate()
                p.wait(10)


if __name__ == "__main__":
    asyncio.run(main())
