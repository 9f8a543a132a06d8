"""the gateway's data plane next to HAProxy 2.6, both terminating TLS in front of one nginx.

Everything runs on loopback, started here with configs in a temp dir: nginx (the backend, plain
HTTP and a TLS port for passthrough), HAProxy (`mode tcp`, `ssl crt` with the gateway's
certificate, `nbthread` = workers) and the gateway's data plane (`python -m
pydstack.gateway.serve`, `[core.proxy] workers`, the debug `localhost-<port>` backend). wrk is
the client; it resolves the gateway's SNI names through a private /etc/hosts bind-mounted in a
mount namespace of its own (needs root), so the machine's files are untouched.

Figures: keep-alive requests/s (c=50), new TLS connections/s (c=20, `Connection: close`), bulk
10 MB MB/s (c=4), p99 latency added to nginx direct (c=10), memory per idle connection (RSS
delta over N held TLS connections / N), and a passthrough run (`-443s`; HAProxy without `ssl`).
Each figure alternates HAProxy and the gateway `--rounds` times and keeps the best of each.
A third column is the same-run floor: ``benchmarks/uvloop_floor.py``, a bare uvloop TLS proxy
(`--workers` processes), what any Python proxy on this machine can at most reach. Prints the
table with both ratios and the load average seen; asserts nothing.

    sudo .venv/bin/python benchmarks/bench_gateway.py [--workers 2] [--seconds 8] [--idle 9000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

from gateway_env import make_pki  # noqa: E402

DOMAIN = "gw.test"
PROXIES = ("haproxy", "gateway", "floor")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


class Stack:
    def __init__(self, tmp: Path, workers: int) -> None:
        self.tmp = tmp
        self.workers = workers
        self.procs: list[subprocess.Popen[bytes]] = []
        self.nginx_port = free_port()
        self.nginx_tls_port = free_port()
        self.haproxy_port = free_port()
        self.haproxy_pt_port = free_port()
        self.gateway_port = free_port()
        self.floor_port = free_port()
        self.gateway_pids: list[int] = []
        self.floor_pids: list[int] = []
        self.haproxy_pid = 0

    def write_files(self) -> None:
        t = self.tmp
        pki = make_pki(DOMAIN)
        (t / "ca.pem").write_text(pki.ca_pem)
        (t / "chain.pem").write_text(pki.chain_pem)
        (t / "key.pem").write_text(pki.key_pem)
        (t / "haproxy.pem").write_text(pki.chain_pem + pki.key_pem)
        t.chmod(0o755)  # nginx's workers (www-data) read the files
        www = t / "www"
        www.mkdir()
        (www / "index.html").write_text("hello from nginx\n")
        with open(www / "10m.bin", "wb") as f:
            f.write(os.urandom(10 << 20))
        (t / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {t}/nginx.pid;
error_log {t}/nginx-error.log warn;
worker_rlimit_nofile 19000;
events {{ worker_connections 18000; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 600s;
  sendfile on;
  server {{ listen 127.0.0.1:{self.nginx_port} backlog=4096; root {www}; }}
  server {{
    listen 127.0.0.1:{self.nginx_tls_port} ssl backlog=4096;
    ssl_certificate {t}/chain.pem; ssl_certificate_key {t}/key.pem;
    root {www};
  }}
}}
""")
        (t / "haproxy.cfg").write_text(f"""
global
  nbthread {self.workers}
  maxconn 9800
  ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
  mode tcp
  timeout connect 5s
  timeout client 600s
  timeout server 600s
frontend fe
  bind 127.0.0.1:{self.haproxy_port} ssl crt {t}/haproxy.pem
  default_backend be
frontend fe_pt
  bind 127.0.0.1:{self.haproxy_pt_port}
  default_backend be_tls
backend be
  server s1 127.0.0.1:{self.nginx_port}
backend be_tls
  server s1 127.0.0.1:{self.nginx_tls_port}
""")
        (t / "gateway.toml").write_text(f"""
[core.proxy]
listen_addr = "127.0.0.1"
listen_port = {self.gateway_port}
workers = {self.workers}
tls_versions = ["1.2", "1.3"]
max_connections_per_app = 0
base_domain = "{DOMAIN}"
cert_chain = "{t}/chain.pem"
cert_key = "{t}/key.pem"
[core.debug]
insecure_localhost_backend = true
""")
        names = [
            f"localhost-{self.nginx_port}.{DOMAIN}",
            f"localhost-{self.nginx_tls_port}s.{DOMAIN}",
        ]
        (t / "hosts").write_text("127.0.0.1 localhost " + " ".join(names) + "\n")

    def start(self) -> None:
        t = self.tmp
        out = open(t / "procs.log", "ab")  # noqa: SIM115
        self.procs.append(
            subprocess.Popen(
                ["nginx", "-c", str(t / "nginx.conf"), "-e", str(t / "nginx-error.log")],
                stdout=out,
                stderr=out,
            )
        )
        hap = subprocess.Popen(["haproxy", "-f", str(t / "haproxy.cfg")], stdout=out, stderr=out)
        self.procs.append(hap)
        self.haproxy_pid = hap.pid
        gw = subprocess.Popen(
            [sys.executable, "-m", "pydstack.gateway.serve", "-c", str(t / "gateway.toml")],
            stdout=subprocess.PIPE,
            stderr=out,
        )
        self.procs.append(gw)
        assert gw.stdout is not None
        line = gw.stdout.readline().decode()
        if not line.startswith("ready"):
            raise RuntimeError(f"gateway did not start: {line!r} (see {t}/procs.log)")
        floor = [
            sys.executable,
            str(REPO / "benchmarks" / "uvloop_floor.py"),
            str(t / "chain.pem"),
            str(t / "key.pem"),
            str(self.floor_port),
            str(self.nginx_port),
        ]
        for _ in range(self.workers):
            p = subprocess.Popen(floor, stdout=subprocess.PIPE, stderr=out)
            self.procs.append(p)
            self.floor_pids.append(p.pid)
            assert p.stdout is not None
            if not p.stdout.readline().startswith(b"ready"):
                raise RuntimeError(f"uvloop floor proxy did not start (see {t}/procs.log)")
        ports = (self.nginx_port, self.nginx_tls_port, self.haproxy_port, self.gateway_port)
        for port in (*ports, self.floor_port):
            wait_port(port)
        kids = subprocess.run(["pgrep", "-P", str(gw.pid)], capture_output=True, text=True)
        self.gateway_pids = [gw.pid] + [int(p) for p in kids.stdout.split()]

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()

    def url(self, proxy: str, path: str, *, passthrough: bool = False) -> str:
        if proxy == "nginx":
            return f"http://127.0.0.1:{self.nginx_port}{path}"
        if passthrough:
            port = self.haproxy_pt_port if proxy == "haproxy" else self.gateway_port
            return f"https://localhost-{self.nginx_tls_port}s.{DOMAIN}:{port}{path}"
        port = {
            "haproxy": self.haproxy_port,
            "gateway": self.gateway_port,
            "floor": self.floor_port,
        }[proxy]
        return f"https://localhost-{self.nginx_port}.{DOMAIN}:{port}{path}"


def wrk(stack: Stack, url: str, conns: int, seconds: int, *extra: str) -> dict[str, float]:
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", *extra, url]
    inner = f"mount --bind {stack.tmp}/hosts /etc/hosts && exec " + " ".join(f"'{c}'" for c in cmd)
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c", inner], capture_output=True, text=True
    ).stdout
    with open(stack.tmp.parent / "bench-gateway-wrk.log", "a") as log:
        log.write(f"$ {' '.join(cmd)}\n{out}\n")
    res: dict[str, float] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    if m:
        scale = {"B": 1 / 2**20, "KB": 1 / 1024, "MB": 1.0, "GB": 1024.0}[m.group(2)]
        res["mbps"] = float(m.group(1)) * scale
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    if m:
        res["p99_ms"] = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m or "Requests/sec" not in out:
        raise RuntimeError(f"wrk saw errors for {url}:\n{out}")
    return res


async def hold_idle(port: int, sni: str, ca: Path, n: int) -> list[asyncio.StreamWriter]:
    ctx = ssl.create_default_context(cafile=str(ca))
    writers: list[asyncio.StreamWriter] = []
    sem = asyncio.Semaphore(64)

    async def one() -> None:
        async with sem:
            try:
                _, w = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, server_hostname=sni
                )
                writers.append(w)
            except OSError:
                pass

    await asyncio.gather(*(one() for _ in range(n)))
    return writers


def idle_memory(stack: Stack, proxy: str, n: int) -> tuple[float, int]:
    pids = {"haproxy": [stack.haproxy_pid], "gateway": stack.gateway_pids}.get(
        proxy, stack.floor_pids
    )
    port = {"haproxy": stack.haproxy_port, "gateway": stack.gateway_port}.get(
        proxy, stack.floor_port
    )
    sni = f"localhost-{stack.nginx_port}.{DOMAIN}"

    async def run() -> tuple[float, int]:
        before = rss_kb(pids)
        writers = await hold_idle(port, sni, stack.tmp / "ca.pem", n)
        await asyncio.sleep(2)
        after = rss_kb(pids)
        held = len(writers)
        for w in writers:
            w.transport.abort()
        await asyncio.sleep(1)
        return ((after - before) * 1024 / max(held, 1), held)

    return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--idle",
        type=int,
        default=9000,
        help="idle connections to hold (HAProxy needs 2 fds each, limit 20000)",
    )
    args = ap.parse_args()
    for tool in ("nginx", "haproxy", "wrk", "unshare"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (scripts/setup.sh installs it)")
    if os.geteuid() != 0:
        raise SystemExit("run as root (wrk resolves the SNI names in a private mount namespace)")
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        stack = Stack(Path(tmp), args.workers)
        stack.write_files()
        stack.start()
        try:
            results = run_all(stack, args)
        finally:
            stack.stop()
    load_after = os.getloadavg()
    report(results, args, load_before, load_after)


def run_all(stack: Stack, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    s = args.seconds
    r: dict[str, dict[str, float]] = {}

    def best(key: str, field: str, proxy: str, val: float, lower: bool = False) -> None:
        cur = r.setdefault(key, {}).get(proxy)
        if cur is None or (val < cur if lower else val > cur):
            r[key][proxy] = val

    p99: dict[str, float] = {}
    for _ in range(args.rounds):
        direct = wrk(stack, stack.url("nginx", "/index.html"), 10, s).get("p99_ms", 0.0)
        p99["nginx"] = min(p99.get("nginx", direct), direct)
        for proxy in PROXIES:
            print(f"running {proxy} ...", file=sys.stderr, flush=True)
            ka = wrk(stack, stack.url(proxy, "/index.html"), 50, s)
            best("keep-alive req/s (c=50)", "rps", proxy, ka["rps"])
            nc = wrk(stack, stack.url(proxy, "/index.html"), 20, s, "-H", "Connection: close")
            best("new TLS conn/s (c=20)", "rps", proxy, nc["rps"])
            bulk = wrk(stack, stack.url(proxy, "/10m.bin"), 4, s)
            best("bulk 10 MB MB/s (c=4)", "mbps", proxy, bulk.get("mbps", 0.0))
            lat = wrk(stack, stack.url(proxy, "/index.html"), 10, s).get("p99_ms", 0.0)
            p99[proxy] = min(p99.get(proxy, lat), lat)
            if proxy == "floor":
                continue  # the floor only terminates
            pk = wrk(stack, stack.url(proxy, "/index.html", passthrough=True), 50, s)
            best("passthrough keep-alive req/s", "rps", proxy, pk["rps"])
            pb = wrk(stack, stack.url(proxy, "/10m.bin", passthrough=True), 4, s)
            best("passthrough bulk MB/s", "mbps", proxy, pb.get("mbps", 0.0))
    r["p99 direct nginx ms (c=10)"] = {"nginx": p99["nginx"]}
    r["added p99 ms (c=10)"] = {p: p99[p] - p99["nginx"] for p in PROXIES}
    for proxy in PROXIES:
        per, held = idle_memory(stack, proxy, args.idle)
        r.setdefault(f"bytes per idle conn (n={args.idle})", {})[proxy] = per
        r.setdefault("idle conns held", {})[proxy] = held
    return r


def report(
    r: dict[str, dict[str, float]],
    args: argparse.Namespace,
    lb: tuple[float, ...],
    la: tuple[float, ...],
) -> None:
    print(
        f"\ngateway data plane vs HAProxy 2.6 (workers={args.workers}, {args.seconds}s runs, "
        f"best of {args.rounds}); load average before {lb[0]:.2f}, after {la[0]:.2f}\n"
        "floor: benchmarks/uvloop_floor.py, a bare uvloop TLS proxy (no SNI, routing or limits)"
    )
    print(
        f"{'figure':<34} {'haproxy':>10} {'gateway':>10} {'floor':>10} "
        f"{'gw/haproxy':>11} {'gw/floor':>9}"
    )
    lower_better = ("added p99", "bytes per idle")
    for key, vals in r.items():
        if "haproxy" not in vals:
            print(f"{key:<34} {vals.get('nginx', 0.0):>10.2f}")
            continue
        h, g, f = vals["haproxy"], vals["gateway"], vals.get("floor")
        lower = any(key.startswith(x) for x in lower_better)
        floor = f"{f:>10.1f}" if f is not None else f"{'-':>10}"
        print(
            f"{key:<34} {h:>10.1f} {g:>10.1f} {floor} "
            f"{_ratio(g, h, lower):>11} {_ratio(g, f, lower):>9}"
        )
    print("ratios are gateway over reference; for added p99 and memory, reference over gateway")


def _ratio(gateway: float, ref: float | None, lower_better: bool) -> str:
    """how the gateway compares, >1 better: g/ref for rates, ref/g for costs."""
    if ref is None:
        return "-"
    if lower_better:
        return f"{ref / gateway:.2f}x" if ref > 0 and gateway > 0 else "n/a"
    return f"{gateway / ref:.2f}x" if ref > 0 else "n/a"


if __name__ == "__main__":
    main()
