"""`vmm.toml`: upstream dstack-vmm's keys, plus `[cvm.<backend>]` for the CVM backend's own
settings (`cvm.backend`, default `sandbox`; the backend parses its table, see `vmm.backends`).

Unknown keys are ignored (upstream configs load unchanged); missing keys take upstream's
defaults. Relative paths resolve against the config file's directory.

Extensions for the external server: top-level `allowed_hosts` (DNS names it may be reached by,
besides localhost and this machine's names; `*.suffix` or `*`) and `allowed_origins` (web
origins, `scheme://host[:port]`, that may call it from a browser), and `[server_limits]`
(`max_connections`, `tls_handshake_timeout`, `header_timeout`, `body_timeout`, `idle_timeout`;
upstream's top-level `keep_alive` is the idle timeout when `idle_timeout` is not set).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydstack.errors import ConfigError
from pydstack.rpc.guard import RequestGuard
from pydstack.rpc.limits import ServerLimits

from .backends import parse_backend_config

DEFAULT_BACKEND = "sandbox"


@dataclass(frozen=True)
class PortRange:
    protocol: str
    start: int
    end: int


@dataclass(frozen=True)
class VmmConfig:
    address: str = "unix:./vmm.sock"
    port: int = 0
    kms_url: str = "http://127.0.0.1:8081"
    event_buffer_size: int = 20
    node_name: str = ""
    run_path: Path = Path("~/.dstack-vmm/vm")
    image_path: Path = Path("~/.dstack-vmm/image")
    #: `[image] registry`: a repository of OS images (ListRegistryImages, PullRegistryImage)
    image_registry: str = ""
    # [cvm]
    kms_urls: tuple[str, ...] = ("http://127.0.0.1:8081",)
    gateway_urls: tuple[str, ...] = ("http://127.0.0.1:8082",)
    pccs_url: str = ""
    docker_registry: str = ""
    max_cvm_number: int = 1000
    max_allocable_vcpu: int = 20
    max_allocable_memory_in_mb: int = 100000
    backend: str = DEFAULT_BACKEND
    port_mapping_enabled: bool = False
    port_mapping_address: str = "127.0.0.1"
    port_ranges: tuple[PortRange, ...] = (PortRange("tcp", 1, 20000),)
    auto_restart_enabled: bool = True
    auto_restart_interval: float = 20.0
    auto_restart_max_retries: int = 5
    auto_restart_initial_backoff: float = 5.0
    auto_restart_max_backoff: float = 300.0
    auto_restart_reset_window: float = 300.0
    log_max_bytes: int = 4 * 1024 * 1024
    log_max_backups: int = 3
    # [cvm.tee_simulator]
    mock_attestation_seed: bytes = b""
    mock_attestation_seed_file: Path | None = None
    # [cvm.<backend>]: the backend's settings, parsed by the backend (vmm.backends)
    backend_config: Any = field(default_factory=lambda: parse_backend_config(DEFAULT_BACKEND, {}))
    # [gateway]
    gateway_base_domain: str = "localhost"
    gateway_port: int = 8082
    gateway_agent_port: int = 8090
    # [auth]
    auth_enabled: bool = False
    auth_tokens: tuple[str, ...] = ()
    #: Apache htpasswd users (bcrypt entries) for Basic auth, besides the tokens
    auth_htpasswd_file: Path | None = None
    # the external server: browser protection and connection limits
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    server_limits: ServerLimits = field(default_factory=ServerLimits)
    config_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def guard(self) -> RequestGuard:
        """the external server's request guard (the lists were validated at load)."""
        return RequestGuard.from_config(list(self.allowed_hosts), list(self.allowed_origins))

    @classmethod
    def load(cls, path: Path | None) -> VmmConfig:
        if path is None:
            return cls()
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid toml: {e}") from e
        return cls.from_dict(raw, path.resolve().parent, path)

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], base: Path | None = None, path: Path | None = None
    ) -> VmmConfig:
        base = base or Path.cwd()

        def p(value: object, default: Path) -> Path:
            if value is None:
                return Path(os.path.expanduser(str(default)))
            out = Path(os.path.expanduser(str(value)))
            return out if out.is_absolute() else (base / out)

        def section(obj: dict[str, Any], name: str) -> dict[str, Any]:
            value = obj.get(name, {})
            if not isinstance(value, dict):
                raise ConfigError(f"[{name}] must be a table")
            return value

        try:
            cvm = section(raw, "cvm")
            pm = section(cvm, "port_mapping")
            ar = section(cvm, "auto_restart")
            logc = section(cvm, "log")
            sim = section(cvm, "tee_simulator")
            gw = section(raw, "gateway")
            auth = section(raw, "auth")
            image = section(raw, "image")
            d = cls()
            seed_hex = str(sim.get("mock_attestation_seed", "")).removeprefix("0x")
            seed = bytes.fromhex(seed_hex) if seed_hex else b""
            if seed and len(seed) != 32:
                raise ConfigError("cvm.tee_simulator.mock_attestation_seed must be 32 bytes")
            seed_file = sim.get("mock_attestation_seed_file")
            htpasswd = auth.get("htpasswd_file")
            ranges = tuple(
                PortRange(str(r.get("protocol", "tcp")), int(r["from"]), int(r["to"]))
                for r in pm.get("range", [{"protocol": "tcp", "from": 1, "to": 20000}])
            )
            for r in ranges:
                if r.protocol not in ("tcp", "udp") or not 0 < r.start <= r.end <= 65535:
                    raise ConfigError(f"invalid port range {r}")
            backend = str(cvm.get("backend", DEFAULT_BACKEND))
            backend_config = parse_backend_config(backend, section(cvm, backend))
            guard = RequestGuard.from_config(raw.get("allowed_hosts"), raw.get("allowed_origins"))
            limits = ServerLimits.from_table(
                section(raw, "server_limits"),
                where="server_limits",
                keep_alive=raw.get("keep_alive"),
            )
            return cls(
                address=str(raw.get("address", d.address)),
                port=int(raw.get("port", 0)),
                kms_url=str(raw.get("kms_url", d.kms_url)),
                event_buffer_size=int(raw.get("event_buffer_size", 20)),
                node_name=str(raw.get("node_name", "")),
                run_path=p(raw.get("run_path"), d.run_path),
                image_path=p(image.get("path", raw.get("image_path")), d.image_path),
                image_registry=str(image.get("registry", "")),
                kms_urls=tuple(str(u) for u in cvm.get("kms_urls", d.kms_urls)),
                gateway_urls=tuple(str(u) for u in cvm.get("gateway_urls", d.gateway_urls)),
                pccs_url=str(cvm.get("pccs_url", "")),
                docker_registry=str(cvm.get("docker_registry", "")),
                max_cvm_number=int(cvm.get("cid_pool_size", 1000)),
                max_allocable_vcpu=int(cvm.get("max_allocable_vcpu", 20)),
                max_allocable_memory_in_mb=int(cvm.get("max_allocable_memory_in_mb", 100000)),
                backend=backend,
                port_mapping_enabled=bool(pm.get("enabled", False)),
                port_mapping_address=str(pm.get("address", "127.0.0.1")),
                port_ranges=ranges,
                auto_restart_enabled=bool(ar.get("enabled", True)),
                auto_restart_interval=float(ar.get("interval", 20)),
                auto_restart_max_retries=int(ar.get("max_retries", 5)),
                auto_restart_initial_backoff=float(ar.get("initial_backoff", 5)),
                auto_restart_max_backoff=float(ar.get("max_backoff", 300)),
                auto_restart_reset_window=float(ar.get("reset_window", 300)),
                log_max_bytes=_size(logc.get("max_bytes", "4M")),
                log_max_backups=int(logc.get("max_backups", 3)),
                mock_attestation_seed=seed,
                mock_attestation_seed_file=p(seed_file, Path()) if seed_file else None,
                backend_config=backend_config,
                gateway_base_domain=str(gw.get("base_domain", "localhost")),
                gateway_port=int(gw.get("port", 8082)),
                gateway_agent_port=int(gw.get("agent_port", 8090)),
                auth_enabled=bool(auth.get("enabled", False)),
                auth_tokens=tuple(str(t) for t in auth.get("tokens", [])),
                auth_htpasswd_file=p(htpasswd, Path()) if htpasswd else None,
                allowed_hosts=tuple(sorted(guard.allowed_hosts)),
                allowed_origins=tuple(raw.get("allowed_origins") or ()),
                server_limits=limits,
                config_path=path,
            )
        except ConfigError:
            raise
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"invalid vmm config: {e}") from e


def _size(value: object) -> int:
    text = str(value).strip().upper().removesuffix("B")
    mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in "KMG" else text
    return int(number) * mult
