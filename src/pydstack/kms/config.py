"""`kms.toml`: upstream's keys (`[core.image] verify, cache_dir, download_url, download_timeout`
included), plus `core.auth_api.simple.config`, `core.key_epoch` and
`core.attestation.max_concurrent_fetches` (PCCS collateral fetches at once, default 4).

Extensions for the listeners (rpc, onboard, admin): `[rpc] allowed_hosts` (DNS names besides
localhost, this machine's names and the rpc certificate's; `*.suffix` or `*`), `[rpc]
allowed_origins` (web origins that may call from a browser) and `[rpc.server_limits]`
(`max_connections`, `tls_handshake_timeout`, `header_timeout`, `body_timeout`, `idle_timeout`;
upstream's Rocket `keep_alive` in `[rpc]` or `[default]` is the idle timeout when
`idle_timeout` is not set).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydstack.errors import ConfigError
from pydstack.rpc.guard import RequestGuard
from pydstack.rpc.limits import ServerLimits
from pydstack.types.netaddr import ascii_decimal


def _seconds(value: object) -> float:
    """seconds as a number or upstream's duration text ("2m", "30s", "1h")."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    units = {"s": 1, "m": 60, "h": 3600}
    count = ascii_decimal(value[:-1], 18) if isinstance(value, str) else None
    if isinstance(value, str) and value[-1:] in units and count is not None:
        return float(count * units[value[-1]])
    raise ConfigError(f"invalid duration {str(value)[:32]!r} (a number of seconds, or 30s, 2m, 1h)")


@dataclass(frozen=True)
class KmsConfig:
    rpc_address: str = "0.0.0.0"
    rpc_port: int = 8000
    cert_dir: Path = Path("/etc/kms/certs")
    site_name: str = ""
    enforce_self_authorization: bool = True
    attest_rpc_cert: bool = True
    key_epoch: int = 0
    guest_agent: str = "/var/run/dstack.sock"
    pccs_url: str = "https://pccs.phala.network"
    root_ca_tdx: Path | None = None
    insecure_allow_external_trust_anchors: bool = False
    collateral_cache_dir: Path | None = None
    max_concurrent_fetches: int = 4
    image_verify: bool = True
    auth_type: str = "webhook"
    webhook_url: str = "http://auth-api:8000"
    dev_gateway_app_id: str = "any"
    simple_config: Path | None = None
    eth_rpc_url: str = ""
    eth_kms_contract: str = ""
    eth_chain_id: int = 0
    auto_bootstrap_domain: str = ""
    onboard_source_url: str = ""
    onboard_enabled: bool = True
    onboard_address: str = "0.0.0.0"
    onboard_port: int = 8000
    metrics_enabled: bool = True
    image_cache_dir: Path = Path("/usr/share/dstack/images")
    image_download_url: str = ""
    image_download_timeout: float = 120.0
    admin_enabled: bool = False
    admin_address: str = "127.0.0.1"
    admin_port: int = 8001
    admin_auth_token: str = ""
    admin_insecure_no_auth: bool = False
    rpc_allowed_hosts: tuple[str, ...] = ()
    rpc_allowed_origins: tuple[str, ...] = ()
    server_limits: ServerLimits = field(default_factory=ServerLimits)

    def guard(self) -> RequestGuard:
        """the listeners' request guard (the lists were validated at load)."""
        return RequestGuard.from_config(
            list(self.rpc_allowed_hosts),
            list(self.rpc_allowed_origins),
            hosts_key="rpc.allowed_hosts",
            origins_key="rpc.allowed_origins",
        )

    @classmethod
    def load(cls, path: Path) -> KmsConfig:
        try:
            return cls.from_toml(path.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from e

    @classmethod
    def from_toml(cls, text: str) -> KmsConfig:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"invalid kms config: {e}") from e

        def tbl(obj: Any, *keys: str) -> dict[str, Any]:
            for k in keys:
                obj = obj.get(k, {}) if isinstance(obj, dict) else {}
            if not isinstance(obj, dict):
                raise ConfigError(f"[{'.'.join(keys)}] must be a table")
            return obj

        rpc, core = tbl(doc, "rpc"), tbl(doc, "core")
        att, auth = tbl(core, "attestation"), tbl(core, "auth_api")
        root_tdx = tbl(att, "root_ca").get("tdx")
        base = cls()
        try:
            guard = RequestGuard.from_config(
                rpc.get("allowed_hosts"),
                rpc.get("allowed_origins"),
                hosts_key="rpc.allowed_hosts",
                origins_key="rpc.allowed_origins",
            )
            keep_alive = rpc.get("keep_alive", tbl(doc, "default").get("keep_alive"))
            limits = ServerLimits.from_table(
                tbl(rpc, "server_limits"), where="rpc.server_limits", keep_alive=keep_alive
            )
        except ValueError as e:
            raise ConfigError(f"invalid kms config: {e}") from e
        cfg = cls(
            rpc_address=str(rpc.get("address", base.rpc_address)),
            rpc_port=int(rpc.get("port", base.rpc_port)),
            cert_dir=Path(core.get("cert_dir", base.cert_dir)),
            site_name=str(core.get("site_name", "")),
            enforce_self_authorization=bool(core.get("enforce_self_authorization", True)),
            attest_rpc_cert=bool(core.get("attest_rpc_cert", True)),
            key_epoch=int(core.get("key_epoch", 0)),
            guest_agent=str(core.get("guest_agent", base.guest_agent)),
            pccs_url=str(tbl(att, "urls").get("pccs", base.pccs_url)),
            root_ca_tdx=Path(root_tdx) if root_tdx else None,
            insecure_allow_external_trust_anchors=bool(
                att.get("insecure_allow_external_trust_anchors", False)
            ),
            collateral_cache_dir=Path(att["cache_dir"]) if att.get("cache_dir") else None,
            max_concurrent_fetches=int(att.get("max_concurrent_fetches", 4)),
            image_verify=bool(tbl(core, "image").get("verify", True)),
            auth_type=str(auth.get("type", "webhook")),
            webhook_url=str(tbl(auth, "webhook").get("url", base.webhook_url)),
            dev_gateway_app_id=str(tbl(auth, "dev").get("gateway_app_id", "any")),
            simple_config=Path(tbl(auth, "simple")["config"])
            if tbl(auth, "simple").get("config")
            else None,
            eth_rpc_url=str(tbl(auth, "eth").get("rpc_url", "")),
            eth_kms_contract=str(tbl(auth, "eth").get("kms_contract", "")),
            eth_chain_id=int(tbl(auth, "eth").get("chain_id", 0)),
            auto_bootstrap_domain=str(tbl(core, "onboard").get("auto_bootstrap_domain", "")),
            onboard_source_url=str(tbl(core, "onboard").get("source_url", "")),
            onboard_enabled=bool(tbl(core, "onboard").get("enabled", True)),
            onboard_address=str(tbl(core, "onboard").get("address", "0.0.0.0")),
            onboard_port=int(tbl(core, "onboard").get("port", 8000)),
            metrics_enabled=bool(tbl(core, "metrics").get("enabled", True)),
            image_cache_dir=Path(tbl(core, "image").get("cache_dir", base.image_cache_dir)),
            image_download_url=str(tbl(core, "image").get("download_url", "")),
            image_download_timeout=_seconds(
                tbl(core, "image").get("download_timeout", base.image_download_timeout)
            ),
            admin_enabled=bool(tbl(core, "admin").get("enabled", False)),
            admin_address=str(tbl(core, "admin").get("address", "127.0.0.1")),
            admin_port=int(tbl(core, "admin").get("port", 8001)),
            admin_auth_token=str(tbl(core, "admin").get("auth_token", "")),
            admin_insecure_no_auth=bool(tbl(core, "admin").get("insecure_no_auth", False)),
            rpc_allowed_hosts=tuple(sorted(guard.allowed_hosts)),
            rpc_allowed_origins=tuple(rpc.get("allowed_origins") or ()),
            server_limits=limits,
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.auth_type not in ("dev", "webhook", "simple", "eth"):
            raise ConfigError(
                f"core.auth_api.type {self.auth_type!r} is not supported "
                "(dev, webhook, simple, eth)"
            )
        if self.auth_type == "eth" and not (
            self.eth_rpc_url and self.eth_kms_contract and self.eth_chain_id
        ):
            raise ConfigError("core.auth_api.eth needs rpc_url, kms_contract and chain_id")
        if self.auth_type == "simple" and self.simple_config is None:
            raise ConfigError("core.auth_api.simple.config must name the allowlist file")
        if self.root_ca_tdx is not None and not self.insecure_allow_external_trust_anchors:
            raise ConfigError(
                "core.attestation.root_ca.tdx needs "
                "core.attestation.insecure_allow_external_trust_anchors = true"
            )
        if self.image_download_url and "{OS_IMAGE_HASH}" not in self.image_download_url:
            raise ConfigError("core.image.download_url must contain {OS_IMAGE_HASH}")
        if not 0 < self.image_download_timeout <= 86400:
            raise ConfigError("core.image.download_timeout must be between 0 and 86400 seconds")
        if not 1 <= self.max_concurrent_fetches <= 64:
            raise ConfigError("core.attestation.max_concurrent_fetches must be between 1 and 64")
        if self.key_epoch < 0 or self.key_epoch >= 2**32:
            raise ConfigError("core.key_epoch must be a 32-bit unsigned integer")
