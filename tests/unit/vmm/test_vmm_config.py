"""vmm.toml loading and the host-memory guard."""

from __future__ import annotations

from pathlib import Path

import pytest

from pydstack.errors import ConfigError
from pydstack.rpc.server import ServerLimits
from pydstack.vmm.backends import make_backend
from pydstack.vmm.backends.sandbox.config import SandboxConfig
from pydstack.vmm.config import PortRange, VmmConfig
from pydstack.vmm.errors import Refused


def load(tmp_path: Path, text: str) -> VmmConfig:
    (tmp_path / "vmm.toml").write_text(text)
    return VmmConfig.load(tmp_path / "vmm.toml")


def test_upstream_keys_and_sandbox_section(tmp_path):
    c = load(
        tmp_path,
        """
address = "unix:./vmm.sock"
run_path = "run/vm"
unknown_upstream_key = 1
[image]
path = "/srv/images"
[cvm]
kms_urls = ["https://10.0.2.2:8000"]
[cvm.port_mapping]
enabled = true
range = [{ protocol = "udp", from = 2000, to = 3000 }]
[cvm.tee_simulator]
mock_attestation_seed = "0x"""
        + "ab" * 32
        + """"
[cvm.sandbox]
subnet = "10.50.0.0/16"
min_free_memory_mb = 1024
""",
    )
    assert c.run_path == tmp_path / "run/vm"
    assert c.image_path == Path("/srv/images")
    assert c.kms_urls == ("https://10.0.2.2:8000",)
    assert c.port_ranges == (PortRange("udp", 2000, 3000),)
    assert c.mock_attestation_seed == bytes.fromhex("ab" * 32)
    assert c.backend == "sandbox"
    assert c.backend_config == SandboxConfig(subnet="10.50.0.0/16", min_free_memory_mb=1024)
    assert c.backend_config.host_ip == "10.50.0.1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[cvm]\nbackend = 'qemu'\n[cvm.qemu]\naccel = 'xen'\n", "cvm.qemu.accel must be"),
        ("[cvm]\nbackend = 'qemu'\n[cvm.qemu]\nhost_share_mode = 'vhd'\n", "host_share_mode"),
        ("[cvm]\nbackend = 'qemu'\n[cvm.qemu]\nnetworking_mode = 'bridge'\n", "bridge is required"),
        ("[cvm]\nbackend = 'qemu'\n[cvm.qemu]\nboot_timeout = 0\n", "boot_timeout must be"),
        ("[cvm]\nbackend = 'xen'\n", "unknown cvm.backend 'xen'"),
        ("[cvm.sandbox]\nbridge = 'a-very-long-bridge-name'\n", "1-15 character"),
        ("[cvm.sandbox]\nhost_ports = [0]\n", "must be ports"),
        ("[cvm.sandbox]\nwireguard_ports = [70000]\n", "wireguard_ports must be ports"),
        ("[cvm.sandbox]\nsubnet = 'nonsense'\n", r"invalid \[cvm.sandbox\]"),
        ("[cvm]\nsandbox = 1\n", "must be a table"),
        ("[cvm.tee_simulator]\nmock_attestation_seed = 'abcd'\n", "32 bytes"),
        ("[cvm.sandbox]\nsubnet = '10.0.0.0/30'\n", "/24 or larger"),
        ("[cvm.port_mapping]\nrange = [{ protocol = 'sctp', from = 1, to = 2 }]\n", "port range"),
        ("cvm = 3\n", "must be a table"),
        ("address = [\n", "not valid toml"),
        ("allowed_hosts = 'vmm.example'\n", "allowed_hosts must be a list of strings"),
        ("allowed_origins = ['vmm.example']\n", "invalid allowed origin"),
        ("[server_limits]\nmax_conections = 5\n", r"unknown key server_limits\.max_conections"),
        ("keep_alive = -1\n", "idle_timeout must be between"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, text)


def test_server_guard_and_limits_keys(tmp_path):
    c = load(
        tmp_path,
        """
keep_alive = 10
allowed_hosts = ["vmm.lab.example", "*.vmm.example"]
allowed_origins = ["https://console.example"]
[server_limits]
max_connections = 64
header_timeout = 5
""",
    )
    assert c.server_limits == ServerLimits(max_connections=64, header_timeout=5, idle_timeout=10)
    guard = c.guard()
    assert guard.host_allowed("vmm.lab.example") and guard.host_allowed("a.vmm.example")
    assert not guard.host_allowed("evil.example")
    assert guard.allowed_origins == frozenset({"https://console.example:443"})
    default = VmmConfig()
    assert default.server_limits == ServerLimits() and not default.guard().host_allowed("x.example")


def test_starting_into_an_exhausted_host_is_refused():
    def backend(min_free: int):
        return make_backend(VmmConfig(backend_config=SandboxConfig(min_free_memory_mb=min_free)))

    with pytest.raises(Refused, match="not enough free host memory"):
        backend(10**9).check_start(None)  # type: ignore[arg-type]
    backend(0).check_start(None)  # type: ignore[arg-type]
