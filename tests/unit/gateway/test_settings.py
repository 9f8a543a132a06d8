"""gateway.toml beyond the data plane: upstream's keys and defaults, relative paths, and the
refusals that keep the gateway from starting open (admin without credentials, no tls, cluster
sync, a wireguard key pair that does not match)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pydstack.errors import ConfigError
from pydstack.gateway.settings import GatewayConfig
from pydstack.gateway.wgconf import generate_private_key, public_key_of

TLS = {"tls": {"key": "rpc.key", "certs": "rpc.crt"}}


def load(doc: dict, base: Path = Path("/etc/gw")) -> GatewayConfig:
    return GatewayConfig.from_dict({**TLS, **doc}, base=base)


def test_defaults_are_upstreams() -> None:
    c = load({})
    assert (c.rpc_address, c.rpc_port) == ("127.0.0.1", 8010)
    assert c.tls.key == Path("/etc/gw/rpc.key") and c.tls.ca_certs is None
    assert not c.tls.mandatory
    w = c.wg
    assert (w.listen_port, w.interface, w.endpoint) == (51820, "wg0", "10.0.2.2:51820")
    assert str(w.network.ip) == "10.0.0.1/24" and str(w.network.client_range) == "10.0.0.0/25"
    assert w.config_path == Path("/etc/wireguard/wg0.conf") and w.private_key == ""
    assert (c.admin.enabled, c.admin.address, c.admin.port) == (False, "127.0.0.1", 8011)
    assert (c.debug_enabled, c.debug_address, c.debug_port) == (False, "127.0.0.1", 8012)
    assert (c.auth.enabled, c.auth.url, c.auth.timeout) == (False, "http://localhost/app-auth", 5)
    assert (c.recycle.enabled, c.recycle.interval, c.recycle.timeout) == (True, 300, 36000)
    assert c.sync.data_dir == Path("/dstack-gateway/data") and c.node_id == 0
    assert c.proxy.listen_ports == (8443,) and c.proxy.agent_port == 8090


def test_keys_are_read() -> None:
    private = generate_private_key()
    c = load(
        {
            "address": "0.0.0.0:9012",
            "keep_alive": 7,
            "tls": {**TLS["tls"], "mutual": {"ca_certs": "/ca.pem", "mandatory": True}},
            "core": {
                "admin": {"enabled": True, "address": "0.0.0.0:9016", "admin_token": "legacy"},
                "auth": {"enabled": True, "url": "http://auth/x", "timeout": "2s"},
                "debug": {"insecure_enable_debug_rpc": True, "address": "127.0.0.1:9015",
                          "insecure_skip_attestation": True},
                "wg": {"private_key": private, "ip": "10.8.0.1/16",
                       "reserved_net": ["10.8.0.1/32"], "client_ip_range": "10.8.0.0/18",
                       "listen_port": 9013, "interface": "wg-ds-gw", "config_path": "wg.conf",
                       "endpoint": "203.0.113.7:9013"},
                "recycle": {"interval": "1m", "timeout": "2h"},
                "sync": {"node_id": 3, "my_url": "https://gw3:9012", "data_dir": "data"},
            },
        }
    )  # fmt: skip
    assert (c.rpc_address, c.rpc_port, c.server_limits.idle_timeout) == ("0.0.0.0", 9012, 7)
    assert c.tls.ca_certs == Path("/ca.pem") and c.tls.mandatory
    assert (c.admin.port, c.admin.auth_token) == (9016, "legacy")
    assert (c.auth.url, c.auth.timeout) == ("http://auth/x", 2)
    assert c.debug_enabled and c.skip_attestation and c.debug_port == 9015
    assert c.wg.public_key == public_key_of(private) and c.wg.interface == "wg-ds-gw"
    assert c.wg.config_path == Path("/etc/gw/wg.conf")
    assert (c.recycle.interval, c.recycle.timeout) == (60, 7200)
    assert (c.node_id, c.sync.data_dir) == (3, Path("/etc/gw/data"))


def test_the_admin_token_may_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("DSTACK_GATEWAY_ADMIN_TOKEN", "from-env")
    assert load({"core": {"admin": {"enabled": True}}}).admin.auth_token == "from-env"


ONE = {"etcd_endpoints": ["http://10.0.0.1:2379"]}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"core": {"admin": {"enabled": True}}}, "admin server needs core.admin.auth_token"),
        ({"core": {"sync": {"enabled": True, **ONE}}}, "node_id must be > 0"),
        ({"core": {"sync": {"enabled": True, "node_id": 1}}}, "needs core.sync.etcd_endpoints"),
        ({"core": {"sync": {"backend": "wavekv"}}}, 'backend must be "etcd"'),
        ({"core": {"sync": {"etcd_endpoints": ["http://u:secret@h:2379"]}}},
         "must not carry a user or password"),
        ({"core": {"sync": {"etcd_endpoints": ["http://h:2379/v3"]}}}, "with no path"),
        ({"core": {"sync": {"etcd_endpoints": ["h:2379"]}}}, "an endpoint must be http"),
        ({"core": {"sync": {"etcd_prefix": "no-slash"}}}, "etcd_prefix must start"),
        ({"core": {"sync": {**ONE, "etcd_cert": "c.pem"}}}, "etcd_cert and core.sync.etcd_key"),
        ({"core": {"sync": {**ONE, "etcd_ca_cert": "ca.pem"}}}, "need https etcd_endpoints"),
        ({"core": {"sync": {"interval": "often"}}}, "core.sync.interval"),
        ({"core": {"rpc_domain": "gw.example"}}, "core.rpc_domain"),
        ({"core": {"wg": {"private_key": generate_private_key(),
                          "public_key": public_key_of(generate_private_key())}}},
         "public_key does not match"),
        ({"core": {"wg": {"public_key": "short"}}}, "invalid wireguard public key"),
        ({"core": {"wg": {"private_key": "short"}}}, "invalid wireguard private key"),
        ({"core": {"wg": {"reserved_net": ["10.9.0.1/32"]}}}, "reserved net"),
        ({"core": {"wg": {"endpoint": "no-port"}}}, "core.wg.endpoint must be host:port"),
        ({"core": {"wg": {"interface": "a-very-long-interface"}}}, "core.wg.interface"),
        ({"core": {"auth": {"enabled": True, "url": "ftp://x"}}}, "core.auth.url"),
        ({"core": {"attestation": {"root_ca": {"tdx": "/r.der"}}}},
         "insecure_allow_external_trust_anchors"),
        ({"address": "host:port"}, "address must be host:port"),
        ({"core": {"recycle": {"interval": "soon"}}}, "core.recycle.interval"),
    ],
)  # fmt: skip
def test_refusals(doc: dict, message: str, monkeypatch) -> None:
    monkeypatch.delenv("DSTACK_GATEWAY_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("ADMIN_API_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=message):
        load(doc)


def test_the_etcd_cluster_settings() -> None:
    c = load({"core": {"sync": {
        "enabled": True, "node_id": 2, "etcd_endpoints": ["https://10.0.0.1:2379/", "https://[::1]:2379"],
        "etcd_prefix": "/gw/", "etcd_ca_cert": "ca.pem", "etcd_cert": "c.pem", "etcd_key": "k.pem",
        "interval": "5s", "timeout": "2s", "sync_connections_interval": "10s",
    }}})  # fmt: skip
    s = c.sync
    assert s.enabled and s.node_id == 2 and s.backend == "etcd"
    assert s.etcd_endpoints == ("https://10.0.0.1:2379", "https://[::1]:2379")
    assert s.etcd_prefix == "/gw" and (s.interval, s.timeout) == (5.0, 2.0)
    assert s.etcd_ca_cert is not None and s.etcd_ca_cert.name == "ca.pem"
    assert s.sync_connections_interval == 10.0 and s.sync_connections_enabled
    # without enabled: a single node, whatever else is set
    assert not load({"core": {"sync": {"node_id": 0}}}).sync.enabled


def test_an_endpoint_with_credentials_is_refused_without_echoing_them() -> None:
    with pytest.raises(ConfigError) as e:
        load({"core": {"sync": {"etcd_endpoints": ["http://root:hunter2@h:2379"]}}})
    assert "hunter2" not in str(e.value)


def test_tls_is_required() -> None:
    with pytest.raises(ConfigError, match=r"\[tls\] key and certs are required"):
        GatewayConfig.from_dict({})


def test_insecure_no_auth_is_an_explicit_choice(monkeypatch) -> None:
    monkeypatch.delenv("DSTACK_GATEWAY_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("ADMIN_API_TOKEN", raising=False)
    c = load({"core": {"admin": {"enabled": True, "insecure_no_auth": True}}})
    assert c.admin.insecure_no_auth and not c.admin.auth_token
