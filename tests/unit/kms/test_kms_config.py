"""kms.toml: the listeners' guard and limits keys."""

from __future__ import annotations

import pytest

from pydstack.errors import ConfigError
from pydstack.kms.config import KmsConfig
from pydstack.rpc.server import ServerLimits

BASE = """
[core.image]
verify = false
"""


def test_rpc_guard_and_limits_keys():
    cfg = KmsConfig.from_toml(
        BASE
        + """
[default]
keep_alive = 10
[rpc]
allowed_hosts = ["kms.example"]
allowed_origins = ["https://onboard.example"]
[rpc.server_limits]
max_connections = 200
tls_handshake_timeout = 5
"""
    )
    assert cfg.server_limits == ServerLimits(
        max_connections=200, tls_handshake_timeout=5, idle_timeout=10
    )
    guard = cfg.guard()
    assert guard.host_allowed("kms.example") and not guard.host_allowed("evil.example")
    assert guard.allowed_origins == frozenset({"https://onboard.example:443"})
    assert guard.hosts_key == "rpc.allowed_hosts"
    # [rpc] keep_alive wins over [default]
    cfg = KmsConfig.from_toml(BASE + "[default]\nkeep_alive = 10\n[rpc]\nkeep_alive = 3\n")
    assert cfg.server_limits.idle_timeout == 3
    assert KmsConfig.from_toml(BASE).server_limits == ServerLimits()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[rpc]\nallowed_hosts = 'kms.example'\n", r"rpc\.allowed_hosts must be a list"),
        ("[rpc]\nallowed_origins = ['*']\n", "invalid allowed origin"),
        ("[rpc.server_limits]\nheader_timeout = 0\n", r"rpc\.server_limits: header_timeout"),
        ("[rpc.server_limits]\nmax_connection = 1\n", r"unknown key rpc\.server_limits"),
    ],
)
def test_bad_guard_or_limits_is_a_config_error(text, message):
    with pytest.raises(ConfigError, match=message):
        KmsConfig.from_toml(BASE + text)
