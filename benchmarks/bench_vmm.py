"""sandbox CVMs: CreateVm -> boot done (median of N), memory per idle CVM, and how many CVMs run at
once before something fails (and what fails).

    .venv/bin/python benchmarks/bench_vmm.py [--boots 5] [--max-cvms 40] [--keep]

Real processes: mock PCCS, dstack-kms and dstack-vmm (pydstack.devstack) on their own bridge;
every CVM runs the sample app's container (podman). Reference: the same container started with
plain `podman run` (no CVM, no attestation, no KMS), which is the floor a sandbox CVM adds to.
Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import pct

from pydstack.apps.image import hello_image
from pydstack.devstack import DevStack, StackError, free_port
from pydstack.guest.compose_runner import host_ulimits
from pydstack.vmm.compose import app_id_of, compose_bytes, compose_hash, make_app_compose
from pydstack.vmm.workdir import spread_subdirectories

COMPOSE = """services:
  hello:
    image: {image}
    environment:
      PORT: "8080"
    volumes:
      - /var/run/dstack.sock:/var/run/dstack.sock
      - data:/data
volumes:
  data:
"""


def app_compose(image: str, name: str, kms: bool) -> str:
    doc = make_app_compose(
        name=name,
        docker_compose=COMPOSE.format(image=image),
        kms=kms,
        key_provider="kms" if kms else "none",
    )
    return compose_bytes(doc).decode()


def create(stack: DevStack, name: str, compose: str, port: int | None = None) -> str:
    body: dict[str, object] = {
        "name": name,
        "image": "pydstack-sandbox",
        "compose_file": compose,
        "vcpu": 1,
        "memory": 256,
        "disk_size": 1,
    }
    if port:
        body["ports"] = [
            {"protocol": "tcp", "host_address": "127.0.0.1", "host_port": port, "vm_port": 8080}
        ]
    return str(stack.rpc("CreateVm", body)["id"])


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                kids = Path(f"/proc/{p}/task/{tid}/children").read_text().split()
                todo.extend(int(k) for k in kids)
        except OSError:
            continue
    return out


def mem_of(pids: list[int]) -> tuple[int, int]:
    """(rss, pss) in bytes over these processes."""
    rss = pss = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, pss


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def launcher_pid(stack: DevStack, vm: str) -> int:
    return int((stack.dir / "run" / "vm" / vm / "launcher.pid").read_text())


#: how often the boot benchmark asks the VMM for progress, and the reference polls its app: the
#: same for both, and small beside the figures (a boot is measured up to POLL late)
POLL = 0.02


def bench_boot(stack: DevStack, image: str, boots: int, kms: bool) -> list[float]:
    compose = app_compose(image, "boot-kms" if kms else "boot", kms)
    raw = compose.encode()
    if kms:
        stack.allow({app_id_of(raw): [compose_hash(raw)]})
    times = []
    stages: list[tuple[str, float]] = []
    for i in range(boots):
        t0 = time.perf_counter()
        stages.clear()
        vm = create(stack, f"boot{i}", compose)
        stack.wait_vm(
            vm,
            timeout=300,
            on_progress=lambda p, t0=t0: stages.append((p, time.perf_counter() - t0)),
            interval=POLL,
        )
        times.append(time.perf_counter() - t0)
        stack.rpc("RemoveVm", {"id": vm})
        while any(v["id"] == vm for v in stack.rpc("Status", {"brief": True})["vms"]):
            time.sleep(0.1)
    print(
        f"    boot progress of the last boot (first seen, polled every {POLL} s): "
        + ", ".join(f"{p} {t:.1f}s" for p, t in stages)
    )
    return times


def wait_app(port: int) -> None:
    """until the sample app on `port` answers, asking every POLL seconds."""
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(POLL)


def bench_podman_reference(image: str, runs: int) -> list[float]:
    """plain `podman run` of the same image until its port answers."""
    times = []
    for _ in range(runs):
        port = free_port()
        name = f"bench-ref-{port}"
        t0 = time.perf_counter()
        subprocess.run(
            [
                "podman", "run", "-d", "--rm", "--name", name, "--network", "host",
                *host_ulimits(), "-e", f"PORT={port}", image,
            ],
            check=True, capture_output=True,
        )  # fmt: skip
        wait_app(port)
        times.append(time.perf_counter() - t0)
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True)
    return times


def _podman_in(cg: Any, store: list[str], *args: str) -> None:
    """podman on the store `store`, started inside the cgroup `cg`."""
    subprocess.run(["podman", *store, *args], check=True, capture_output=True, preexec_fn=cg.join)


def bench_pull_reference(stack: DevStack, image: str, runs: int) -> list[float]:
    """what a CVM's boot cannot avoid: `podman pull` from the stack's registry into a fresh
    store, then `podman run` until the app answers, in a cgroup of one CPU and 256 MiB (the
    benchmark's CVM size), without any of dstack's work."""
    from pydstack.vmm.backends.sandbox import cgroups

    remote = f"{stack.registry_push}/library/{image}"
    times = []
    # each store in a directory of its own block group, as the VMM puts its VM directories
    parent = Path(tempfile.mkdtemp(prefix="bench-pull-"))
    spread_subdirectories(parent)
    for i in range(runs):
        cg = cgroups.create(f"bench-pull-{os.getpid()}-{i}", 1, 256)
        port = free_port()
        name = f"bench-pull-{port}"
        tmp = tempfile.mkdtemp(dir=parent)
        store = ["--root", f"{tmp}/root", "--runroot", f"{tmp}/run"]
        try:
            t0 = time.perf_counter()
            _podman_in(cg, store, "pull", "--quiet", "--tls-verify=false", remote)
            _podman_in(cg, store, "run", "-d", "--name", name, "--network", "host",
                       *host_ulimits(), "-e", f"PORT={port}", remote)  # fmt: skip
            wait_app(port)
            times.append(time.perf_counter() - t0)
        finally:
            subprocess.run(["podman", *store, "rm", "-f", "-t", "0", name], capture_output=True)
            subprocess.run(["podman", *store, "system", "reset", "-f"], capture_output=True)
            subprocess.run(["umount", "-R", "-l", f"{tmp}/root"], capture_output=True)
            subprocess.run(["rm", "-rf", tmp], capture_output=True)
            cg.remove()
    parent.rmdir()
    return times


def bench_many(stack: DevStack, image: str, limit: int) -> None:
    compose = app_compose(image, "many", False)
    vms: list[str] = []
    avail0 = mem_available()
    failure = ""
    t0 = time.perf_counter()
    try:
        for i in range(limit):
            port = free_port()
            try:
                vm = create(stack, f"many{i}", compose, port)
                vms.append(vm)
                stack.wait_vm(vm, timeout=300)
                r = stack.wait_http(f"http://127.0.0.1:{port}/health")
                r.raise_for_status()
            except (StackError, httpx.HTTPError) as e:
                failure = f"cvm #{i + 1}: {e}"
                break
            if (i + 1) % 10 == 0:
                used = (avail0 - mem_available()) / (i + 1) / 2**20
                print(
                    f"    {i + 1} cvms running ({time.perf_counter() - t0:.0f} s, "
                    f"~{used:.0f} MiB host memory each)",
                    flush=True,
                )
        running = sum(
            1 for v in stack.rpc("Status", {"brief": True})["vms"] if v["status"] == "running"
        )
        used = avail0 - mem_available()
        print(f"  concurrent cvms running: {running}")
        each = used / max(running, 1) / 2**20
        print(f"  host memory used by them: {used / 2**20:.0f} MiB ({each:.0f} MiB each)")
        if failure:
            print(f"  first failure: {failure}")
            print("  vmm log tail:")
            print("    " + "\n    ".join(stack.procs["vmm"].log.read_text().splitlines()[-5:]))
        else:
            print(f"  no failure up to --max-cvms {limit} (raise it to find the limit)")
    finally:
        stack.remove_all()


def bench_idle(stack: DevStack, image: str, n: int) -> None:
    """idle memory per cvm: pss and rss over `n` cvms running the sample app."""
    print(f"\nmemory per idle cvm (sample app, {n} cvms, 5 s after boot)")
    compose = app_compose(image, "idle", False)
    vms = [create(stack, f"idle{i}", compose) for i in range(n)]
    for vm in vms:
        stack.wait_vm(vm, timeout=300)
    time.sleep(5)
    rows = [mem_of(descendants(launcher_pid(stack, vm))) for vm in vms]
    rss = [r for r, _ in rows]
    pss = [p for _, p in rows]
    mib = 2**20
    p90 = pct([float(x) for x in pss], 90) / mib
    print(f"  pss per cvm: median {statistics.median(pss) / mib:.1f} MiB (p90 {p90:.1f})")
    print(f"  rss per cvm: median {statistics.median(rss) / mib:.1f} MiB (shared pages in each)")
    stack.remove_all()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--boots", type=int, default=5)
    ap.add_argument("--idle", type=int, default=3, help="cvms to measure idle memory over")
    ap.add_argument("--max-cvms", type=int, default=40, help="0 skips the concurrency run")
    ap.add_argument("--keep", action="store_true", help="keep the stack directory")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("error: needs root", file=sys.stderr)
        return 2
    local = hello_image()
    d = Path(tempfile.mkdtemp(prefix="bench-vmm-"))
    stack = DevStack(d, bridge="dstackbench0", subnet="10.216.0.0/16")
    try:
        stack.start()
        image = stack.push_image(local)  # cvms pull it from the stack's registry
        avail = mem_available() / 2**30
        print(f"sandbox cvm benchmark ({os.cpu_count()} cpus, {avail:.1f} GiB available)")

        print(f"\nCreateVm -> boot done, {args.boots} boots each (fresh cvm every time)")
        for kms in (False, True):
            t = bench_boot(stack, image, args.boots, kms)
            label = "key provider kms " if kms else "key provider none"
            print(
                f"  {label}: median {statistics.median(t):.2f} s  "
                f"min {min(t):.2f}  max {max(t):.2f}"
            )
        ref = bench_podman_reference(local, args.boots)
        med = statistics.median(ref)
        print(f"  reference, plain podman run until the app answers: median {med:.2f} s")
        ref = bench_pull_reference(stack, image, args.boots)
        med = statistics.median(ref)
        print(
            "  reference, podman pull into a fresh store and run, in one cpu and 256 MiB: "
            f"median {med:.2f} s  min {min(ref):.2f}  max {max(ref):.2f}"
        )

        if args.idle:
            bench_idle(stack, image, args.idle)

        if args.max_cvms:
            print(f"\nconcurrent cvms (up to {args.max_cvms}), each with a port mapping")
            bench_many(stack, image, args.max_cvms)
        print(json.dumps({"dir": str(d)}) if args.keep else "")
        return 0
    finally:
        stack.stop(remove_bridge=True)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(d)], check=False)


if __name__ == "__main__":
    sys.exit(main())
