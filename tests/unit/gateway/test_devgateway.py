"""the dev stack's gateway.toml: the stack CA's static wildcard, or (the main job) no static
certificate and the certbot pointed at the stack's pebble and bind9."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydstack.devgateway import GatewayFiles, gateway_toml
from pydstack.gateway.settings import GatewayConfig


def _toml(tmp_path: Path, **kw: object) -> GatewayConfig:
    text = gateway_toml(
        GatewayFiles(tmp_path),
        rpc_address="10.213.0.1",
        rpc_port=9012,
        admin_port=9016,
        admin_token="t" * 32,
        proxy_port=8443,
        wg_port=9013,
        wg_subnet="100.100.213.0/24",
        interface="gwdstack0",
        **kw,  # type: ignore[arg-type]
    )
    return GatewayConfig.from_dict(tomllib.loads(text), base=tmp_path)


def test_the_static_wildcard_without_acme(tmp_path: Path) -> None:
    cfg = _toml(tmp_path)
    assert cfg.proxy.base_domain == "dstack.localhost"
    assert cfg.proxy.cert_chain == str(tmp_path / "proxy.crt")
    assert cfg.certbot.acme_ca_bundle is None and cfg.certbot.dns_resolvers == ()


def test_the_certbot_against_the_stacks_pebble_and_bind9(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, acme_ca_bundle=tmp_path / "pebble.pem", dns_resolver="127.0.0.1:5353")
    assert cfg.proxy.base_domain == "" and cfg.proxy.cert_chain == ""
    assert cfg.certbot.enabled and cfg.certbot.acme_ca_bundle == tmp_path / "pebble.pem"
    assert cfg.certbot.dns_resolvers == ("127.0.0.1:5353",)
    assert cfg.proxy.external_port == 8443
