"""guest agent requests per second and latency, with load generators that are not the bottleneck.

`dstack-simulator` serves the agent on its unix socket and on an HTTP listener. Two loads:

* wrk (C, its own threads) against the HTTP listener;
* a multi-process raw HTTP/1.1 keep-alive client on the unix socket (the SDKs' transport).

Rows: `Version` (no work: the floor of the HTTP stack), `GetKey`, `Info`, `GetQuote`; each
with its ratio to `Version`, and the in-process cost of the work itself (a key and its signature
chain, a quote) as a second floor. A GetQuote answer is about 31 KB (the quote, the versioned
attestation and the event log, as upstream's), so a last row, `blob`, is the same HTTP stack
answering a GetQuote answer's bytes without any work: GetQuote's floor on the wire.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import pct

CALLS = {
    "Version": b"{}",
    "GetKey": b'{"path":"/bench","purpose":"signing"}',
    "Info": b"{}",
    "GetQuote": b'{"report_data":"01"}',
}


def start_simulator(d: str, port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pydstack.guest.simulator", "--dir", f"{d}/sim",
         "--http", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if "export TAPPD" in line:
            return proc
    raise RuntimeError("dstack-simulator did not start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wrk(port: int, method: str, body: bytes, conns: int, secs: float, d: str) -> tuple[float, ...]:
    script = Path(d) / f"{method}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body.decode())}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    out = subprocess.run(
        ["wrk", "-t2", f"-c{conns}", f"-d{int(secs)}s", "--latency", "-s", str(script),
         f"http://127.0.0.1:{port}/{method}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def ms(label: str) -> float:
        m = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out)
        if m is None:
            return float("nan")
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, ms("50"), ms("99"), float(errors.group(1)) if errors else 0.0


def _unix_worker(sock: str, method: str, body: bytes, conns: int, secs: float, q: mp.Queue) -> None:
    """`conns` keep-alive connections driven from one process with select-free round robin."""
    request = (
        f"POST /{method} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    socks = []
    for _ in range(conns):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock)
        socks.append(s)
    lat: list[float] = []
    errors = 0
    end = time.perf_counter() + secs
    import selectors

    sel = selectors.DefaultSelector()
    sent: dict[socket.socket, float] = {}
    bufs: dict[socket.socket, bytes] = {}
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
        s.sendall(request)
        sent[s] = time.perf_counter()
        bufs[s] = b""
    while time.perf_counter() < end:
        for key, _ in sel.select(1):
            s = key.fileobj  # type: ignore[assignment]
            data = s.recv(65536)  # type: ignore[attr-defined]
            if not data:
                return
            buf = bufs[s] + data  # type: ignore[index]
            head, sep, rest = buf.partition(b"\r\n\r\n")
            if not sep:
                bufs[s] = buf  # type: ignore[index]
                continue
            m = re.search(rb"content-length: (\d+)", head, re.I)
            need = int(m.group(1)) if m else 0
            if len(rest) < need:
                bufs[s] = buf  # type: ignore[index]
                continue
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
            bufs[s] = rest[need:]  # type: ignore[index]
            now = time.perf_counter()
            lat.append(now - sent[s])  # type: ignore[index]
            s.sendall(request)  # type: ignore[attr-defined]
            sent[s] = now  # type: ignore[index]
    q.put((lat, errors))


def unix(sock: str, method: str, body: bytes, procs: int, conns: int, secs: float) -> tuple:
    q: mp.Queue = mp.Queue()
    workers = [
        mp.Process(target=_unix_worker, args=(sock, method, body, conns, secs, q))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    lat: list[float] = []
    errors = 0
    for _ in workers:
        part, err = q.get(timeout=secs + 60)
        lat += part
        errors += err
    for w in workers:
        w.join()
    return len(lat) / secs, pct(lat, 50) * 1e3, pct(lat, 99) * 1e3, float(errors)


def start_blob_server(d: str, body: bytes, port: int) -> subprocess.Popen[str]:
    """`blob_server.py` answering `body` on `{d}/blob.sock` and `port`."""
    (Path(d) / "blob.json").write_bytes(body)
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "blob_server.py"), f"{d}/blob.json",
         f"{d}/blob.sock", str(port)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("blob_server did not start")
    return proc


def quote_answer(sock: str) -> bytes:
    """one GetQuote answer's body, from the simulator."""
    body = CALLS["GetQuote"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock)
        s.sendall(
            b"POST /GetQuote HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.partition(b"\r\n\r\n")[2]


def work_floor(d: str) -> dict[str, float]:
    """the work itself, in process: per second."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "src"))
    from pydstack.crypto import k256
    from pydstack.guest.simulator import boot, prepare

    tdx, core = boot(prepare(Path(d) / "floor", bytes(32)))
    out = {}
    n = 300
    t = time.perf_counter()
    for i in range(n):
        k256.get_key_chain(core.keys.k256_key, f"/p{i}", "signing", "secp256k1",
                           core.keys.k256_signature)  # fmt: skip
    out["GetKey"] = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(100):
        tdx.get_quote(b"\x01")
    out["GetQuote"] = 100 / (time.perf_counter() - t)
    return out


def main() -> None:
    secs = float(os.environ.get("BENCH_SECONDS", "5"))
    conns = int(os.environ.get("BENCH_CONNS", "32"))
    with tempfile.TemporaryDirectory() as d:
        port = free_port()
        sim = start_simulator(d, port)
        try:
            floors = work_floor(d)
            load = os.getloadavg()[0]
            print(f"# dstack-simulator, {conns} connections, {secs:.0f} s per row, load {load:.1f}")
            print(f"# the work alone, in process: key + chain {floors['GetKey']:.0f}/s, "
                  f"quote {floors['GetQuote']:.0f}/s")  # fmt: skip
            answer = quote_answer(f"{d}/sim/dstack.sock")
            blob_port = free_port()
            blob = start_blob_server(d, answer, blob_port)
            print(f"# a GetQuote answer: {len(answer)} bytes; blob: that answer, no work")
            for label, run, run_blob in (
                (
                    "wrk http",
                    lambda m, b: wrk(port, m, b, conns, secs, d),
                    lambda: wrk(blob_port, "Blob", b"{}", conns, secs, d),
                ),
                (
                    "unix x2 procs",
                    lambda m, b: unix(f"{d}/sim/dstack.sock", m, b, 2, conns // 2, secs),
                    lambda: unix(f"{d}/blob.sock", "Blob", b"{}", 2, conns // 2, secs),
                ),
            ):
                base = None
                rows = {}
                for method, body in CALLS.items():
                    rows[method] = rps, p50, p99, errors = run(method, body)
                    base = base or rps
                    print(f"  {label:<14} {method:<9} {rps:9.0f} req/s  p50 {p50:6.2f} ms  "
                          f"p99 {p99:6.2f} ms  {rps / base:5.2f}x Version  errors {errors:.0f}",
                          flush=True)  # fmt: skip
                rps, p50, p99, errors = run_blob()
                ratio = rows["GetQuote"][0] / rps
                print(f"  {label:<14} {'blob':<9} {rps:9.0f} req/s  p50 {p50:6.2f} ms  "
                      f"p99 {p99:6.2f} ms  GetQuote at {ratio:4.2f}x of it  errors {errors:.0f}",
                      flush=True)  # fmt: skip
            blob.terminate()
            blob.wait(10)
        finally:
            sim.terminate()
            sim.wait(10)


if __name__ == "__main__":
    main()
