"""the whole ``gateway.toml`` of ``dstack-gateway`` (§8): the control plane's keys around the data
plane's :class:`~.config.ProxyConfig`, upstream's names and defaults.

* top level: ``address`` (``"127.0.0.1:8010"``, or a host with ``port``), ``keep_alive`` (the main
  server's idle timeout), ``[tls] key, certs, [tls.mutual] ca_certs, mandatory`` (required: the
  main server speaks HTTPS; without ``ca_certs`` no client certificate is asked for and every
  RegisterCvm is refused);
* ``[core] rpc_domain`` (must stay empty: this gateway takes its RPC certificate from ``[tls]``);
* ``[core.attestation]`` as the KMS reads it: ``urls.pccs``, ``root_ca.tdx`` (needs
  ``insecure_allow_external_trust_anchors``), ``cache_dir``;
* ``[core.auth] enabled, url, timeout`` (the registration webhook);
* ``[core.admin] enabled, address, auth_token`` (legacy ``admin_token``; else env
  ``DSTACK_GATEWAY_ADMIN_TOKEN`` or ``ADMIN_API_TOKEN``), ``htpasswd_file``, ``insecure_no_auth``:
  an enabled admin server with neither a token nor an htpasswd file refuses to start;
* ``[core.debug] insecure_enable_debug_rpc, insecure_skip_attestation, address``;
* ``[core.wg] public_key, private_key, listen_port, ip, reserved_net, client_ip_range,
  config_path, interface, endpoint`` (an empty ``private_key`` is generated once into
  ``<data_dir>/wg.key``, 0600);
* ``[core.recycle] enabled, interval, timeout, node_timeout``;
* ``[core.sync] enabled, node_id, my_url, bootnode, data_dir, interval, timeout,
  persist_interval, sync_connections_enabled, sync_connections_interval`` (upstream's), plus
  ``backend`` (``"etcd"``, the only cluster backend), ``etcd_endpoints`` (``http(s)://host:port``,
  no credentials in them), ``etcd_prefix`` (``"/dstack-gateway"``), ``etcd_ca_cert``,
  ``etcd_cert``, ``etcd_key`` (client TLS for https endpoints). Without ``enabled`` the state
  lives in ``data_dir`` (one node); with it, in etcd, and ``node_id`` must be > 0.
  ``interval`` is how often a node re-reads the cluster state besides its watch, ``timeout``
  how long one etcd member may take to answer one request before the next member is asked.
* ``[core.certbot]`` (pydstack's; upstream keeps every certbot setting in its store and has no
  such section): ``enabled`` (true: the ZT-domains' certificates by ACME DNS-01),
  ``acme_ca_bundle`` (PEM roots for the ACME server's TLS, e.g. a test CA's; empty: the
  system's), ``dns_resolvers`` (``ip:port`` servers for the DNS-01 propagation self-check;
  empty: the system's), ``agent`` (the guest agent that attests issued keys; empty: the
  default socket or ``DSTACK_SIMULATOR_ENDPOINT``, none there: keys are not attested).

Relative paths (``[tls]``, ``core.wg.config_path``, ``core.sync.data_dir``, ``core.proxy``'s
``cert_chain``/``cert_key``...) are taken from the config file's directory.

A bad value is a :class:`~pydstack.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydstack.certbot.model import split_server
from pydstack.errors import ConfigError, InputError
from pydstack.rpc.limits import ServerLimits
from pydstack.types.netaddr import parse_port

from .config import ProxyConfig, _Reader, _table
from .wgconf import WgKeyError, WgNetwork, check_public_key, public_key_of


def split_address(value: str, key: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) → (host, port); ConfigError naming `key`."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = value, "" if default_port is None else str(default_port)
    host = host.strip("[]")
    number = parse_port(port, allow_zero=True)
    if not host or number is None:
        raise ConfigError(f"{key} must be host:port, got {value!r}")
    return host, number


@dataclass(frozen=True)
class TlsSettings:
    key: Path
    certs: Path
    ca_certs: Path | None = None
    mandatory: bool = False


@dataclass(frozen=True)
class AttestationSettings:
    pccs_url: str = "https://pccs.phala.network"
    root_ca_tdx: Path | None = None
    insecure_allow_external_trust_anchors: bool = False
    cache_dir: Path | None = None


@dataclass(frozen=True)
class AuthSettings:
    enabled: bool = False
    url: str = "http://localhost/app-auth"
    timeout: float = 5.0


@dataclass(frozen=True)
class AdminSettings:
    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = 8011
    auth_token: str = ""
    htpasswd_file: Path | None = None
    insecure_no_auth: bool = False


@dataclass(frozen=True)
class WgSettings:
    public_key: str
    private_key: str
    listen_port: int
    network: WgNetwork
    config_path: Path
    interface: str
    endpoint: str


@dataclass(frozen=True)
class RecycleSettings:
    enabled: bool = True
    interval: float = 300.0
    timeout: float = 36000.0
    node_timeout: float = 600.0


@dataclass(frozen=True)
class SyncSettings:
    node_id: int = 0
    my_url: str = "https://localhost:8011"
    bootnode: str = ""
    data_dir: Path = Path("/dstack-gateway/data")
    enabled: bool = False
    interval: float = 60.0
    timeout: float = 30.0
    persist_interval: float = 300.0
    sync_connections_enabled: bool = True
    sync_connections_interval: float = 30.0
    backend: str = "etcd"
    etcd_endpoints: tuple[str, ...] = ()
    etcd_prefix: str = "/dstack-gateway"
    etcd_ca_cert: Path | None = None
    etcd_cert: Path | None = None
    etcd_key: Path | None = None


@dataclass(frozen=True)
class CertbotHostSettings:
    enabled: bool = True
    acme_ca_bundle: Path | None = None
    dns_resolvers: tuple[str, ...] = ()
    agent: str = ""


@dataclass(frozen=True)
class GatewayConfig:
    rpc_address: str
    rpc_port: int
    tls: TlsSettings
    wg: WgSettings
    proxy: ProxyConfig
    attestation: AttestationSettings = field(default_factory=AttestationSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    recycle: RecycleSettings = field(default_factory=RecycleSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    certbot: CertbotHostSettings = field(default_factory=CertbotHostSettings)
    server_limits: ServerLimits = field(default_factory=ServerLimits)
    debug_enabled: bool = False
    debug_address: str = "127.0.0.1"
    debug_port: int = 8012
    skip_attestation: bool = False

    @property
    def node_id(self) -> int:
        return self.sync.node_id

    @classmethod
    def load(cls, path: Path) -> GatewayConfig:
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from e
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"invalid gateway config: {e}") from e
        return cls.from_dict(doc, base=path.parent)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, base: Path = Path(".")) -> GatewayConfig:
        """the config of a parsed gateway.toml; relative paths are taken from `base`."""

        def path(value: str) -> Path:
            p = Path(value)
            return p if p.is_absolute() else base / p

        proxy = ProxyConfig.from_dict(doc)
        if proxy.base_domain:
            proxy = dataclasses.replace(
                proxy, cert_chain=str(path(proxy.cert_chain)), cert_key=str(path(proxy.cert_key))
            )

        top = _Reader(doc, "")
        core = _table(doc, "core", "core")
        c = _Reader(core, "core")
        if c.get_str("rpc_domain", ""):
            raise ConfigError(
                "core.rpc_domain (certificates from a guest agent) is not supported: "
                "give the rpc certificate in [tls] key and certs"
            )
        host, port = split_address(top.get_str("address", "127.0.0.1:8010"), "address", 8010)
        if "port" in doc:
            port = top.get_int("port", port, 0, 65535)
        try:
            limits = ServerLimits.from_table(
                _table(doc, "server_limits", "server_limits"),
                where="server_limits",
                keep_alive=doc.get("keep_alive"),
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None

        tls_t = _table(doc, "tls", "tls")
        if not tls_t:
            raise ConfigError("[tls] key and certs are required (the main rpc server is https)")
        t = _Reader(tls_t, "tls")
        mutual = _Reader(_table(tls_t, "mutual", "tls.mutual"), "tls.mutual")
        key, certs = t.get_str("key", ""), t.get_str("certs", "")
        if not key or not certs:
            raise ConfigError("tls.key and tls.certs must name the rpc key and certificate chain")
        ca = mutual.get_str("ca_certs", "")
        tls = TlsSettings(
            key=path(key),
            certs=path(certs),
            ca_certs=path(ca) if ca else None,
            mandatory=mutual.get_bool("mandatory", False),
        )

        att_t = _table(core, "attestation", "core.attestation")
        a = _Reader(att_t, "core.attestation")
        root = _Reader(_table(att_t, "root_ca", "core.attestation.root_ca"), "root_ca")
        root_tdx = root.get_str("tdx", "")
        cache = a.get_str("cache_dir", "")
        attestation = AttestationSettings(
            pccs_url=_Reader(_table(att_t, "urls", "core.attestation.urls"), "urls").get_str(
                "pccs", AttestationSettings.pccs_url
            ),
            root_ca_tdx=path(root_tdx) if root_tdx else None,
            insecure_allow_external_trust_anchors=a.get_bool(
                "insecure_allow_external_trust_anchors", False
            ),
            cache_dir=path(cache) if cache else None,
        )
        if attestation.root_ca_tdx and not attestation.insecure_allow_external_trust_anchors:
            raise ConfigError(
                "core.attestation.root_ca.tdx needs "
                "core.attestation.insecure_allow_external_trust_anchors = true"
            )

        u = _Reader(_table(core, "auth", "core.auth"), "core.auth")
        auth = AuthSettings(
            enabled=u.get_bool("enabled", False),
            url=u.get_str("url", AuthSettings.url),
            timeout=u.get_duration("timeout", 5.0, positive=True),
        )
        if auth.enabled and not auth.url.startswith(("http://", "https://")):
            raise ConfigError("core.auth.url must be an http(s) url")

        ad_t = _table(core, "admin", "core.admin")
        ad = _Reader(ad_t, "core.admin")
        a_host, a_port = split_address(
            ad.get_str("address", "127.0.0.1:8011"), "core.admin.address"
        )
        token = ad.get_str("auth_token", "") or ad.get_str("admin_token", "")
        token = (
            token
            or os.environ.get("DSTACK_GATEWAY_ADMIN_TOKEN", "")
            or os.environ.get("ADMIN_API_TOKEN", "")
        )
        htpasswd = ad.get_str("htpasswd_file", "")
        admin = AdminSettings(
            enabled=ad.get_bool("enabled", False),
            address=a_host,
            port=a_port,
            auth_token=token,
            htpasswd_file=path(htpasswd) if htpasswd else None,
            insecure_no_auth=ad.get_bool("insecure_no_auth", False),
        )
        if admin.enabled and not (token or htpasswd or admin.insecure_no_auth):
            raise ConfigError(
                "the admin server needs core.admin.auth_token (or DSTACK_GATEWAY_ADMIN_TOKEN) or "
                "core.admin.htpasswd_file; set insecure_no_auth = true to run it without"
            )

        sync = _sync(_table(core, "sync", "core.sync"), path)

        wg_t = _table(core, "wg", "core.wg")
        w = _Reader(wg_t, "core.wg")
        network = WgNetwork.parse(
            w.get_str("ip", "10.0.0.1/24"),
            w.get_str_list("reserved_net", ["10.0.0.1/32"]),
            w.get_str("client_ip_range", "10.0.0.0/25"),
        )
        private = w.get_str("private_key", "")
        public = w.get_str("public_key", "")
        try:
            if private:
                derived = public_key_of(private)
                if public and public != derived:
                    raise ConfigError("core.wg.public_key does not match core.wg.private_key")
                public = derived
            elif public:
                check_public_key(public)
        except WgKeyError as e:
            raise ConfigError(f"core.wg: {e}") from None
        endpoint = w.get_str("endpoint", "10.0.2.2:51820")
        split_address(endpoint, "core.wg.endpoint")
        interface = w.get_str("interface", "wg0")
        if not 0 < len(interface) <= 15 or "/" in interface:
            raise ConfigError("core.wg.interface must be a 1-15 character interface name")
        wg = WgSettings(
            public_key=public,
            private_key=private,
            listen_port=w.get_int("listen_port", 51820, 1, 65535),
            network=network,
            config_path=path(w.get_str("config_path", "/etc/wireguard/wg0.conf")),
            interface=interface,
            endpoint=endpoint,
        )

        r = _Reader(_table(core, "recycle", "core.recycle"), "core.recycle")
        recycle = RecycleSettings(
            enabled=r.get_bool("enabled", True),
            interval=r.get_duration("interval", 300.0, positive=True),
            timeout=r.get_duration("timeout", 36000.0, positive=True),
            node_timeout=r.get_duration("node_timeout", 600.0),
        )
        cb = _Reader(_table(core, "certbot", "core.certbot"), "core.certbot")
        bundle = cb.get_str("acme_ca_bundle", "")
        resolvers = tuple(cb.get_str_list("dns_resolvers", []))
        for server in resolvers:
            try:
                split_server(server)
            except InputError as e:
                raise ConfigError(f"core.certbot.dns_resolvers: {e}") from None
        certbot = CertbotHostSettings(
            enabled=cb.get_bool("enabled", True),
            acme_ca_bundle=path(bundle) if bundle else None,
            dns_resolvers=resolvers,
            agent=cb.get_str("agent", ""),
        )
        d_host, d_port = split_address(proxy.debug_address, "core.debug.address")
        return cls(
            rpc_address=host,
            rpc_port=port,
            tls=tls,
            wg=wg,
            proxy=proxy,
            attestation=attestation,
            auth=auth,
            admin=admin,
            recycle=recycle,
            sync=sync,
            certbot=certbot,
            server_limits=limits,
            debug_enabled=proxy.insecure_enable_debug_rpc,
            debug_address=d_host,
            debug_port=d_port,
            skip_attestation=proxy.insecure_skip_attestation,
        )


def _sync(table: Mapping[str, Any], path: Callable[[str], Path]) -> SyncSettings:
    """``[core.sync]``; ConfigError naming the key."""
    from .etcd import check_endpoint
    from .etcdstore import check_prefix

    s = _Reader(table, "core.sync")
    d = SyncSettings()

    def opt_path(key: str) -> Path | None:
        value = s.get_str(key, "")
        return path(value) if value else None

    enabled = s.get_bool("enabled", False)
    node_id = s.get_int("node_id", 0, 0, 2**32 - 1)
    backend = s.get_str("backend", d.backend)
    if backend != "etcd":
        raise ConfigError('core.sync.backend must be "etcd"')
    endpoints = tuple(check_endpoint(e) for e in s.get_str_list("etcd_endpoints", []))
    try:
        prefix = check_prefix(s.get_str("etcd_prefix", d.etcd_prefix))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cert, key, ca = opt_path("etcd_cert"), opt_path("etcd_key"), opt_path("etcd_ca_cert")
    if (cert is None) != (key is None):
        raise ConfigError("core.sync.etcd_cert and core.sync.etcd_key go together")
    if (cert or ca) and not all(e.startswith("https://") for e in endpoints):
        raise ConfigError("core.sync.etcd_ca_cert/etcd_cert need https etcd_endpoints")
    if enabled:
        if node_id == 0:
            raise ConfigError("core.sync.node_id must be > 0 when core.sync.enabled")
        if not endpoints:
            raise ConfigError("core.sync.enabled needs core.sync.etcd_endpoints")
    return SyncSettings(
        node_id=node_id,
        my_url=s.get_str("my_url", d.my_url),
        bootnode=s.get_str("bootnode", ""),
        data_dir=path(s.get_str("data_dir", str(d.data_dir))),
        enabled=enabled,
        interval=s.get_duration("interval", d.interval, positive=True),
        timeout=s.get_duration("timeout", d.timeout, positive=True),
        persist_interval=s.get_duration("persist_interval", d.persist_interval, positive=True),
        sync_connections_enabled=s.get_bool("sync_connections_enabled", d.sync_connections_enabled),
        sync_connections_interval=s.get_duration(
            "sync_connections_interval", d.sync_connections_interval, positive=True
        ),
        backend=backend,
        etcd_endpoints=endpoints,
        etcd_prefix=prefix,
        etcd_ca_cert=ca,
        etcd_cert=cert,
        etcd_key=key,
    )
