"""the sandbox backend's host-independent parts (no root): per-VM addresses, recognising its
launcher processes again, its capabilities; and the VMM's log rotation."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pydstack.vmm.backends import make_backend
from pydstack.vmm.backends.sandbox.backend import NET_FILE, SandboxBackend
from pydstack.vmm.backends.sandbox.config import SandboxConfig
from pydstack.vmm.backends.sandbox.launcher import LEGACY_MODULE, MODULE, is_launcher
from pydstack.vmm.config import VmmConfig
from pydstack.vmm.errors import Refused
from pydstack.vmm.logrotate import rotate, start_boot_logs
from pydstack.vmm.runtime import VmRuntime
from pydstack.vmm.vm import Vm
from pydstack.vmm.workdir import VmManifest, VmWorkDir, new_vm_id


def vm_in(run: Path, name: str) -> Vm:
    wd = VmWorkDir.create(run, VmManifest(id=new_vm_id(), name=name, app_id="ab" * 20), {})
    return Vm(wd, wd.manifest(), VmRuntime(wd))


def backend(subnet: str = "10.213.0.0/16") -> SandboxBackend:
    b = make_backend(VmmConfig(backend_config=SandboxConfig(bridge="dsbr9", subnet=subnet)))
    assert isinstance(b, SandboxBackend)
    return b


def test_addresses_are_unique_kept_across_restarts_and_freed(tmp_path):
    b = backend("10.9.0.0/24")
    a, c = vm_in(tmp_path, "a"), vm_in(tmp_path, "c")
    b.attach(a)
    b.attach(c)
    assert (b.guest_address(a), b.guest_address(c)) == ("10.9.0.2", "10.9.0.3")
    # a fresh vmm finds the same addresses; a clash (a copied directory) gets a new one
    again = backend("10.9.0.0/24")
    (c.workdir.path / NET_FILE).write_text(json.dumps({"ip_index": 2}))
    again.attach(a)
    again.attach(c)
    assert again.guest_address(a) == "10.9.0.2" and again.guest_address(c) == "10.9.0.3"
    assert json.loads((c.workdir.path / NET_FILE).read_text()) == {"ip_index": 3}
    again.detach(a)
    d = vm_in(tmp_path, "d")
    again.attach(d)
    assert again.guest_address(d) == "10.9.0.2"
    iface = again.interfaces(d)[0]
    assert (iface.mode, iface.bridge_name) == ("bridge", "dsbr9") and iface.mac.startswith("02:")
    assert not again.is_alive(d) and again.process(d) is None
    assert again.guest_api_address(d) is None


def test_cvms_may_reach_the_gateways_wireguard_only_when_there_is_a_gateway():
    settings = SandboxConfig(bridge="dsbr9", wireguard_ports=(51999,))
    with_gw = SandboxBackend(
        VmmConfig(gateway_urls=("https://10.213.0.1:9012",), backend_config=settings), settings
    )
    assert with_gw.cvm_udp_ports() == {51999}
    assert 9012 in with_gw.cvm_host_ports() and 51999 not in with_gw.cvm_host_ports()
    none = SandboxBackend(VmmConfig(gateway_urls=(), backend_config=settings), settings)
    assert none.cvm_udp_ports() == set()
    assert SandboxConfig.from_table({}).wireguard_ports == (51820,)


def test_a_full_subnet_is_a_refusal(tmp_path):
    b = backend("10.9.0.0/24")
    for i in range(253):  # .2 to .254
        b.attach(vm_in(tmp_path, f"v{i}"))
    with pytest.raises(Refused, match="no free address left"):
        b.attach(vm_in(tmp_path, "one-too-many"))


def _wait_for_exec(pid: int) -> None:
    cmdline = Path(f"/proc/{pid}/cmdline")
    for _ in range(1000):
        if b"--spec" in cmdline.read_bytes():
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not start its command")


@pytest.mark.parametrize("module", [MODULE, LEGACY_MODULE])
def test_launchers_are_recognised_by_module_and_spec(tmp_path, module):
    spec = tmp_path / "launch.json"
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    proc = subprocess.Popen([*sleeper, module, "--spec", str(spec)])
    other = subprocess.Popen([*sleeper, module, "--spec", str(tmp_path / "other.json")])
    try:
        for p in (proc, other):  # until each child has exec'd (before, /proc shows pytest's)
            _wait_for_exec(p.pid)
        assert is_launcher(proc.pid, spec)
        assert not is_launcher(other.pid, spec)  # another cvm's launcher
    finally:
        for p in (proc, other):
            p.kill()
            p.wait()
    assert not is_launcher(proc.pid, spec)  # gone (its pid may be reused by anything)


def test_sandbox_capabilities_drive_what_the_api_offers():
    caps = backend().capabilities
    assert caps.networking_modes == ("bridge",) and caps.bridges == ("dsbr9",)
    assert not (caps.gpus or caps.hugepages or caps.pin_numa or caps.hardware_tee)
    assert caps.tee_kinds == ("simulated-tdx",) and caps.image_kinds == ("sandbox",)


def test_log_rotation_keeps_the_configured_backups(tmp_path):
    log = tmp_path / "serial.log"
    for boot in range(4):
        log.write_text(f"boot {boot}\n")
        rotate(log, 2)
    assert not log.exists()
    assert (tmp_path / "serial.log.1").read_text() == "boot 3\n"
    assert (tmp_path / "serial.log.2").read_text() == "boot 2\n"
    assert not (tmp_path / "serial.log.3").exists()
    (tmp_path / "stdout.log").write_text("old output\n")
    start_boot_logs(tmp_path, 0, now=0)
    assert log.read_text() == "===== boot @ 1970-01-01T00:00:00Z =====\n"
    assert (tmp_path / "stdout.log").read_text() == ""
