"""the README's main job runs end to end: local kms + vmm deploying the sample app."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from pydstack.devstack import free_port
from pydstack.vmm.backends.sandbox.network import names_for

#: the main job's bridge and subnet (DevStack's defaults)
BRIDGE, SUBNET = "dstack0", "10.213.0.0/16"


def test_demo_main_job(tmp_path):
    out = subprocess.run(
        [
            sys.executable, "-m", "pydstack.demo", "--dir", str(tmp_path / "demo"),
            "--port", str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("[ok]") == 7 and "FAILED" not in out.stdout
    assert "boot: done" in out.stdout and "Created VM" not in out.stderr
    assert "[ok] the app answered through the gateway by app id (tls verified)" in out.stdout
    assert (tmp_path / "demo/mock-root-ca.der").is_file()
    # the stack cleaned up after itself: no cvm left behind
    assert not any((tmp_path / "demo/run/vm").iterdir())


def _demo(d: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pydstack.demo", "--dir", str(d), "--port", str(port), *extra]


def _processes_naming(d: Path) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if str(d).encode() in (p / "cmdline").read_bytes():
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def _read_until(proc: subprocess.Popen[str], marker: str) -> str:
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return line
    raise AssertionError(f"the main job ended before printing {marker!r}:\n{''.join(seen)}")


def _nothing_of_the_stack_left(d: Path, vm_ids: list[str]) -> None:
    assert _processes_naming(d) == []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for vm in vm_ids:
        assert names_for(vm)[0] not in netns
    assert subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0
    # nor the gateway's wireguard interface (its wireguard-go went with it)
    gw = subprocess.run(["ip", "link", "show", f"gw{BRIDGE}"], capture_output=True)
    assert gw.returncode != 0
    rules = subprocess.run(["iptables", "-w", "-S"], capture_output=True, text=True).stdout
    assert f"DS-IN-{BRIDGE}" not in rules and f"DS-FWD-{BRIDGE}" not in rules
    nat = subprocess.run(["iptables", "-w", "-t", "nat", "-S"], capture_output=True, text=True)
    assert SUBNET not in nat.stdout


def test_a_killed_main_job_is_cleaned_up_by_the_next_run(tmp_path):
    d, port = tmp_path / "demo", free_port()
    first = subprocess.Popen(_demo(d, port), stdout=subprocess.PIPE, text=True)
    try:
        vm = _read_until(first, "    vm ").split()[-1]
        _read_until(first, "    boot: ")  # its cvm is booting
    finally:
        first.kill()  # no chance to clean up
        first.wait()
    assert _processes_naming(d)  # the stack it started runs on without it
    out = subprocess.run(_demo(d, port), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "stopped what an earlier run left behind" in out.stdout
    assert f"vm {vm}" in out.stdout
    assert out.stdout.count("[ok]") == 7
    second = out.stdout.split("    vm ")[1].split()[0]
    _nothing_of_the_stack_left(d, [vm, second])


def test_serve_takes_everything_down_on_sigterm(tmp_path):
    d, port = tmp_path / "demo", free_port()
    proc = subprocess.Popen(_demo(d, port, "--serve"), stdout=subprocess.PIPE, text=True)
    try:
        vm = _read_until(proc, "    vm ").split()[-1]
        assert "dstack.localhost" in _read_until(proc, "the app: https://")
        _read_until(proc, "press ctrl-c")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _nothing_of_the_stack_left(d, [vm])
