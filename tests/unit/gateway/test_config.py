"""the data-plane keys of gateway.toml: upstream defaults, durations, ports, refusals."""

from __future__ import annotations

import pytest

from pydstack.errors import ConfigError
from pydstack.gateway.config import (
    ProxyConfig,
    config_from_plain,
    config_to_plain,
    parse_duration,
)


def test_upstream_defaults() -> None:
    c = ProxyConfig.from_toml("")
    assert c.tls_versions == ("1.2",)
    assert (c.listen_addr, c.listen_ports, c.agent_port) == ("0.0.0.0", (8443,), 8090)
    assert (c.buffer_size, c.connect_top_n, c.workers) == (65536, 3, 32)
    assert (c.max_connections_per_app, c.inbound_pp_enabled) == (2000, False)
    assert (c.app_address_ns_prefix, c.app_address_ns_compat) == ("_dstack-app-address", True)
    t = c.timeouts
    assert (t.connect, t.handshake, t.cache_top_n, t.handshake_stale) == (5, 5, 30, 1800)
    assert (t.dns_resolve, t.idle, t.shutdown, t.total, t.pp_header) == (5, 600, 5, 18000, 5)
    assert t.data_timeout_enabled is True
    f = c.port_policy_fetch
    assert (f.timeout, f.max_retries, f.backoff_initial, f.backoff_max) == (10, 5, 1, 30)
    assert not (c.insecure_localhost_backend or c.insecure_enable_debug_rpc)
    assert (c.tcp_splice, c.ktls) == (False, False)


def test_values_and_unknown_keys() -> None:
    c = ProxyConfig.from_toml(
        """
        unknown_top = 1
        [core]
        set_ulimit = false
        whatever = "ignored"
        [core.proxy]
        listen_port = "9000-9002"
        tls_versions = ["1.2", "1.3"]
        workers = 2
        connect_top_n = 0
        inbound_pp_enabled = true
        base_domain = "example.com"
        cert_chain = "/c.pem"
        cert_key = "/k.pem"
        some_future_key = true
        [core.proxy.timeouts]
        idle = "1h30m"
        connect = "500ms"
        total = 7
        [core.proxy.tcp_splice]
        [core.debug]
        insecure_localhost_backend = true
        """
    )
    assert c.listen_ports == (9000, 9001, 9002)
    assert c.tls_versions == ("1.2", "1.3") and c.workers == 2 and c.connect_top_n == 0
    assert c.timeouts.idle == 5400 and c.timeouts.connect == 0.5 and c.timeouts.total == 7
    assert c.tcp_splice and not c.ktls and not c.set_ulimit
    assert c.insecure_localhost_backend and c.base_domain == "example.com"
    assert config_from_plain(config_to_plain(c)) == c


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[core.proxy]\nlisten_port = 0", "core.proxy.listen_port"),
        ('[core.proxy]\nlisten_port = "9-8"', "core.proxy.listen_port"),
        ('[core.proxy]\nlisten_port = "1-2000"', "core.proxy.listen_port"),
        ("[core.proxy]\nlisten_port = true", "core.proxy.listen_port"),
        ("[core.proxy]\nworkers = 0", "core.proxy.workers"),
        ('[core.proxy]\nworkers = "2"', "core.proxy.workers"),
        ('[core.proxy]\ntls_versions = ["1.1"]', "core.proxy.tls_versions"),
        ('[core.proxy]\ntls_versions = "1.2"', "core.proxy.tls_versions"),
        ('[core.proxy]\ntls_crypto_provider = "x"', "core.proxy.tls_crypto_provider"),
        ("[core.proxy]\ninbound_pp_enabled = 1", "core.proxy.inbound_pp_enabled"),
        ('[core.proxy]\nbase_domain = "a.b"', "core.proxy.base_domain"),
        ('[core.proxy.timeouts]\nidle = "soon"', "core.proxy.timeouts.idle"),
        ('[core.proxy.timeouts]\nconnect = "0s"', "core.proxy.timeouts.connect"),
        ("[core.proxy.timeouts]\nhandshake = -1", "core.proxy.timeouts.handshake"),
        ("[core.proxy.port_policy_fetch]\nmax_retries = -1", "max_retries"),
        ('[core.debug]\ninsecure_localhost_backend = "yes"', "insecure_localhost_backend"),
        ("[core]\nproxy = 5", "[core.proxy]"),
        ("[core.proxy]\ntcp_splice = 1", "core.proxy.tcp_splice"),
        ("[core.proxy", "invalid gateway config"),
    ],
)
def test_bad_values_name_the_key(toml: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace(".", r"\.")):
        ProxyConfig.from_toml(toml)


def test_durations() -> None:
    assert parse_duration("5s", "k") == 5
    assert parse_duration("10m", "k") == 600
    assert parse_duration("1h 30m", "k") == 5400
    assert parse_duration("2d", "k") == 172800
    assert parse_duration(1.5, "k") == 1.5
    for bad in ("", "5", "5x", "s5", True, None, -1, "5s junk"):
        with pytest.raises(ConfigError, match="k"):
            parse_duration(bad, "k")
