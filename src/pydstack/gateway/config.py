"""the data-plane keys of ``gateway.toml``: ``[core.proxy]`` (with ``timeouts`` and
``port_policy_fetch``), ``[core.debug]`` and ``core.set_ulimit``, upstream's names and defaults.

Unknown keys are ignored (the control plane reads the rest of the file). A bad value is a
:class:`~pydstack.errors.ConfigError` naming the key. Durations are humantime strings as upstream
writes them (``"5s"``, ``"10m"``, ``"1h30m"``, ``"500ms"``) or plain numbers of seconds.
``listen_port`` is an int or a ``"a-b"`` range (one listener per port). Accepted for
compatibility and not used here: ``tls_crypto_provider`` (OpenSSL does the TLS),
``thread_per_core`` and ``connection_rebalance`` (workers are processes on SO_REUSEPORT),
``external_port`` (upstream does not read it either), ``timeouts.write`` (unused upstream).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydstack.errors import ConfigError
from pydstack.types.netaddr import ascii_decimal

from .certstore import CertStoreError, tls_version_range

_DURATION = re.compile(
    r"(\d+(?:\.\d+)?)\s*(ms|msec|s|sec|secs|m|min|mins|h|hr|hrs|d|days?)", re.ASCII
)
_UNITS = {
    "ms": 0.001, "msec": 0.001,
    "s": 1.0, "sec": 1.0, "secs": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}  # fmt: skip


def parse_duration(value: object, key: str) -> float:
    """seconds from a humantime string or a number; ConfigError naming `key` otherwise."""
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a duration")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"{key} must not be negative")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a duration")
    text = value.strip()
    total, pos = 0.0, 0
    for m in _DURATION.finditer(text):
        if text[pos : m.start()].strip():
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos == 0 or text[pos:].strip():
        raise ConfigError(f'{key} must be a duration like "5s" or "10m", got {value!r}')
    return total


@dataclass(frozen=True)
class Timeouts:
    """``[core.proxy.timeouts]`` in seconds."""

    connect: float = 5.0
    handshake: float = 5.0
    cache_top_n: float = 30.0
    handshake_stale: float = 1800.0
    dns_resolve: float = 5.0
    data_timeout_enabled: bool = True
    idle: float = 600.0
    write: float = 5.0
    shutdown: float = 5.0
    total: float = 5 * 3600.0
    pp_header: float = 5.0


@dataclass(frozen=True)
class PortPolicyFetch:
    """``[core.proxy.port_policy_fetch]``: the lazy fetch from a CVM agent's ``Info``."""

    timeout: float = 10.0
    max_retries: int = 5
    backoff_initial: float = 1.0
    backoff_max: float = 30.0


@dataclass(frozen=True)
class ProxyConfig:
    """``[core.proxy]`` plus the ``[core.debug]`` switches the data plane honours."""

    tls_crypto_provider: str = "aws-lc-rs"
    tls_versions: tuple[str, ...] = ("1.2",)
    listen_addr: str = "0.0.0.0"
    listen_ports: tuple[int, ...] = (8443,)
    agent_port: int = 8090
    buffer_size: int = 65536
    connect_top_n: int = 3
    app_address_ns_prefix: str = "_dstack-app-address"
    app_address_ns_compat: bool = True
    app_address_dns_servers: tuple[str, ...] = ()
    workers: int = 32
    thread_per_core: bool = True
    connection_rebalance: bool = True
    external_port: int = 443
    max_connections_per_app: int = 2000
    inbound_pp_enabled: bool = False
    base_domain: str = ""
    cert_chain: str = ""
    cert_key: str = ""
    tcp_splice: bool = False
    ktls: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    port_policy_fetch: PortPolicyFetch = field(default_factory=PortPolicyFetch)
    set_ulimit: bool = True
    insecure_enable_debug_rpc: bool = False
    insecure_localhost_backend: bool = False
    insecure_skip_attestation: bool = False
    debug_address: str = "127.0.0.1:8012"

    @classmethod
    def load(cls, path: Path) -> ProxyConfig:
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from e
        return cls.from_toml(text)

    @classmethod
    def from_toml(cls, text: str) -> ProxyConfig:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"invalid gateway config: {e}") from e
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ProxyConfig:
        """from the whole parsed gateway.toml (only the data-plane keys are read)."""
        core = _table(doc, "core", "core")
        proxy = _table(core, "proxy", "core.proxy")
        debug = _table(core, "debug", "core.debug")
        tmo = _table(proxy, "timeouts", "core.proxy.timeouts")
        ppf = _table(proxy, "port_policy_fetch", "core.proxy.port_policy_fetch")
        d = cls()
        p = _Reader(proxy, "core.proxy")
        t = _Reader(tmo, "core.proxy.timeouts")
        f = _Reader(ppf, "core.proxy.port_policy_fetch")
        g = _Reader(debug, "core.debug")
        dt_, df = Timeouts(), PortPolicyFetch()
        versions = tuple(p.get_str_list("tls_versions", list(d.tls_versions)))
        try:
            tls_version_range(versions)
        except CertStoreError as e:
            raise ConfigError(f"core.proxy.tls_versions: {e}") from None
        provider = p.get_str("tls_crypto_provider", d.tls_crypto_provider)
        if provider not in ("aws-lc-rs", "ring"):
            raise ConfigError('core.proxy.tls_crypto_provider must be "aws-lc-rs" or "ring"')
        timeouts = Timeouts(
            connect=t.get_duration("connect", dt_.connect, positive=True),
            handshake=t.get_duration("handshake", dt_.handshake, positive=True),
            cache_top_n=t.get_duration("cache_top_n", dt_.cache_top_n),
            handshake_stale=t.get_duration("handshake_stale", dt_.handshake_stale, positive=True),
            dns_resolve=t.get_duration("dns_resolve", dt_.dns_resolve, positive=True),
            data_timeout_enabled=t.get_bool("data_timeout_enabled", dt_.data_timeout_enabled),
            idle=t.get_duration("idle", dt_.idle, positive=True),
            write=t.get_duration("write", dt_.write),
            shutdown=t.get_duration("shutdown", dt_.shutdown, positive=True),
            total=t.get_duration("total", dt_.total, positive=True),
            pp_header=t.get_duration("pp_header", dt_.pp_header, positive=True),
        )
        fetch = PortPolicyFetch(
            timeout=f.get_duration("timeout", df.timeout, positive=True),
            max_retries=f.get_int("max_retries", df.max_retries, 0, 1000),
            backoff_initial=f.get_duration("backoff_initial", df.backoff_initial),
            backoff_max=f.get_duration("backoff_max", df.backoff_max),
        )
        base_domain = p.get_str("base_domain", "")
        chain, key = p.get_str("cert_chain", ""), p.get_str("cert_key", "")
        if base_domain and not (chain and key):
            raise ConfigError("core.proxy.base_domain needs cert_chain and cert_key")
        return cls(
            tls_crypto_provider=provider,
            tls_versions=versions,
            listen_addr=p.get_str("listen_addr", d.listen_addr),
            listen_ports=_listen_ports(proxy.get("listen_port", 8443)),
            agent_port=p.get_int("agent_port", d.agent_port, 1, 65535),
            buffer_size=p.get_int("buffer_size", d.buffer_size, 1024, 16 << 20),
            connect_top_n=p.get_int("connect_top_n", d.connect_top_n, 0, 1000),
            app_address_ns_prefix=p.get_str("app_address_ns_prefix", d.app_address_ns_prefix),
            app_address_ns_compat=p.get_bool("app_address_ns_compat", d.app_address_ns_compat),
            app_address_dns_servers=tuple(p.get_str_list("app_address_dns_servers", [])),
            workers=p.get_int("workers", d.workers, 1, 1024),
            thread_per_core=p.get_bool("thread_per_core", d.thread_per_core),
            connection_rebalance=p.get_bool("connection_rebalance", d.connection_rebalance),
            external_port=p.get_int("external_port", d.external_port, 1, 65535),
            max_connections_per_app=p.get_int(
                "max_connections_per_app", d.max_connections_per_app, 0, 1 << 31
            ),
            inbound_pp_enabled=p.get_bool("inbound_pp_enabled", d.inbound_pp_enabled),
            base_domain=base_domain,
            cert_chain=chain,
            cert_key=key,
            tcp_splice=_section(proxy, "tcp_splice"),
            ktls=_section(proxy, "ktls"),
            timeouts=timeouts,
            port_policy_fetch=fetch,
            set_ulimit=_Reader(core, "core").get_bool("set_ulimit", d.set_ulimit),
            insecure_enable_debug_rpc=g.get_bool("insecure_enable_debug_rpc", False),
            insecure_localhost_backend=g.get_bool("insecure_localhost_backend", False),
            insecure_skip_attestation=g.get_bool("insecure_skip_attestation", False),
            debug_address=g.get_str("address", d.debug_address),
        )


def _table(obj: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = obj.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{where}] must be a table")
    return value


def _section(proxy: Mapping[str, Any], key: str) -> bool:
    """an optional acceleration section: present (a table) means on."""
    if key not in proxy:
        return False
    _table(proxy, key, f"core.proxy.{key}")
    return True


def _listen_ports(value: object) -> tuple[int, ...]:
    key = "core.proxy.listen_port"
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= 65535:
            raise ConfigError(f"{key} must be in 1..65535")
        return (value,)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", value, re.ASCII)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if 1 <= lo <= hi <= 65535 and hi - lo < 1024:
                return tuple(range(lo, hi + 1))
        port = ascii_decimal(value.strip(), 5)
        if port is not None:
            return _listen_ports(port)
    raise ConfigError(f'{key} must be a port or a range "a-b" of at most 1024 ports')


class _Reader:
    def __init__(self, table: Mapping[str, Any], where: str) -> None:
        self.table = table
        self.where = where

    def _key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get_str(self, key: str, default: str) -> str:
        value = self.table.get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self._key(key)} must be a string")
        return value

    def get_bool(self, key: str, default: bool) -> bool:
        value = self.table.get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._key(key)} must be true or false")
        return value

    def get_int(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self.table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(f"{self._key(key)} must be an integer in {lo}..{hi}")
        return value

    def get_duration(self, key: str, default: float, *, positive: bool = False) -> float:
        value = parse_duration(self.table.get(key, default), self._key(key))
        if positive and value <= 0:
            raise ConfigError(f"{self._key(key)} must be positive")
        return value

    def get_str_list(self, key: str, default: list[str]) -> list[str]:
        value = self.table.get(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self._key(key)} must be a list of strings")
        return list(value)


def config_to_plain(config: ProxyConfig) -> dict[str, Any]:
    """the config as JSON-able data (to hand to a worker process)."""
    return dataclasses.asdict(config)


def config_from_plain(data: Mapping[str, Any]) -> ProxyConfig:
    """the inverse of :func:`config_to_plain` (ConfigError for a foreign shape)."""
    try:
        d = dict(data)
        d["timeouts"] = Timeouts(**d["timeouts"])
        d["port_policy_fetch"] = PortPolicyFetch(**d["port_policy_fetch"])
        for key in ("tls_versions", "listen_ports", "app_address_dns_servers"):
            d[key] = tuple(d[key])
        return ProxyConfig(**d)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"bad worker config: {e}") from None
