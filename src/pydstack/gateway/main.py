"""``dstack-gateway -c gateway.toml``: the gateway process (§1.1).

Starts, in order: the state store (``core.sync.data_dir``, or etcd with ``core.sync.enabled``:
:func:`~.cluster.build_cluster`), the WireGuard interface with the
stored instances as peers, the ``[core.proxy] workers`` relay processes, the main RPC server
(HTTPS, ``[tls]``, client certificates checked against ``tls.mutual.ca_certs``), the admin server
(``[core.admin]``, token or htpasswd, with the dashboard) and the debug server
(``core.debug.insecure_enable_debug_rpc``); then polls WireGuard handshakes every 10 s,
recycles stale instances every ``core.recycle.interval`` and runs the certbot (``[core.certbot]``:
the ZT-domains' certificates from ``<data_dir>/certbot.json`` are served from the start, renewed
in the background and hot-reloaded into the workers, see :mod:`.zt_certs`). Prints
``dstack-gateway listening on https://HOST:PORT`` once everything serves; SIGTERM, SIGINT or
``Admin.Exit`` stop it (the WireGuard interface stays up, so a restart keeps the tunnels).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from pydstack import __version__
from pydstack.attest.evidence import EvidenceVerifier
from pydstack.attest.verify import CollateralCache
from pydstack.certbot.acme_client import AcmeOptions
from pydstack.certbot.attest import AgentAttester, Attester
from pydstack.certbot.certbot import Certbot, LibAcmeBackend
from pydstack.certbot.errors import CertbotError
from pydstack.certbot.lock import DomainLock, FileDomainLock
from pydstack.certbot.storage import FileKv, KeyValue, KvCertStorage
from pydstack.errors import ConfigError, DstackError
from pydstack.rpc.auth import Htpasswd, auth_middleware
from pydstack.rpc.json_codec import message_to_obj
from pydstack.rpc.proto import gateway_rpc_pb2 as pb
from pydstack.rpc.server import PrpcServer

from .certstore import CertStoreError
from .cluster import CERTBOT_KV_FILE, CERTBOT_LOCK_FILE, Cluster, build_cluster
from .control import GatewayControl, NodeIdentity
from .dashboard import render_dashboard
from .identity import AuthWebhook
from .policy_fetch import PolicyFetcher
from .serve import load_static
from .service import GatewayContext, admin_services, debug_service, gateway_service
from .settings import GatewayConfig
from .wgconf import HandshakeCache, WgKeyError, generate_private_key, public_key_of
from .wgdevice import WgDevice, WgError, write_private
from .workers import WorkerPool, raise_nofile
from .zt_certs import ZtCerts

log = logging.getLogger("dstack-gateway")

WG_KEY_FILE = "wg.key"
UUID_FILE = "node_uuid"
#: the certbot's records (upstream's key layout) and its locks, in ``core.sync.data_dir``
CERTBOT_STORE = CERTBOT_KV_FILE
CERTBOT_LOCKS = CERTBOT_LOCK_FILE
HEADERS = {"X-App-Version": __version__}
#: how often the handshake poller wakes (the cache decides when to read)
POLL_TICK = 1.0


def wg_keys(cfg: GatewayConfig) -> tuple[str, str]:
    """(private, public): the configured key, else ``<data_dir>/wg.key`` (made once, 0600)."""
    if cfg.wg.private_key:
        return cfg.wg.private_key, cfg.wg.public_key
    path = cfg.sync.data_dir / WG_KEY_FILE
    try:
        private = path.read_text().strip()
    except FileNotFoundError:
        private = generate_private_key()
        write_private(path, private + "\n")
        log.info("generated the wireguard key %s", path)
    try:
        public = public_key_of(private)
    except WgKeyError as e:
        raise ConfigError(f"{path}: {e}") from None
    if cfg.wg.public_key and cfg.wg.public_key != public:
        raise ConfigError(f"core.wg.public_key does not match the key in {path}")
    return private, public


def node_uuid(data_dir: Path) -> bytes:
    path = data_dir / UUID_FILE
    try:
        raw = bytes.fromhex(path.read_text().strip())
        if len(raw) == 16:
            return raw
    except (FileNotFoundError, ValueError):
        pass
    raw = os.urandom(16)
    write_private(path, raw.hex() + "\n")
    return raw


def local_certbot_store(data_dir: Path) -> tuple[KeyValue, DomainLock]:
    """the certbot's key-value space and lock for a gateway alone on its machine: JSON files in
    `data_dir` (0600, replaced atomically, ``flock``-ed)."""
    return FileKv(data_dir / CERTBOT_STORE), FileDomainLock(data_dir / CERTBOT_LOCKS)


def default_attester(cfg: GatewayConfig) -> Attester | None:
    """the guest agent that attests issued keys (``core.certbot.agent``, else the default
    socket or ``DSTACK_SIMULATOR_ENDPOINT``); None when there is none (keys not attested)."""
    from pydstack.sdk.client import get_endpoint

    endpoint = get_endpoint(cfg.certbot.agent or None)
    if not endpoint.startswith(("http://", "https://")) and not os.path.exists(endpoint):
        log.warning("no guest agent at %s: issued certificate keys will not be attested", endpoint)
        return None
    return AgentAttester(endpoint)


def build_certbot(
    cfg: GatewayConfig, kv: KeyValue, lock: DomainLock, attester: Attester | None = None
) -> Certbot:
    """the distributed certbot of node ``core.sync.node_id`` over `kv` and `lock` (local files,
    or a cluster's store), reaching the ACME server and the DNS as ``[core.certbot]`` says.
    ConfigError when ``acme_ca_bundle`` cannot be read."""
    c = cfg.certbot
    if c.acme_ca_bundle is not None:
        _read(c.acme_ca_bundle, "core.certbot.acme_ca_bundle")
    options = AcmeOptions(
        ca_bundle=str(c.acme_ca_bundle) if c.acme_ca_bundle is not None else None,
        dns_servers=c.dns_resolvers,
    )
    return Certbot(
        KvCertStorage(kv),
        lock,
        node_id=cfg.node_id,
        attester=attester,
        backend=LibAcmeBackend(options),
    )


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from e


class Gateway:
    """one running gateway node."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        self.stop = asyncio.Event()
        self.servers: list[PrpcServer] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.pool: WorkerPool | None = None
        self.device: WgDevice | None = None
        self.urls: dict[str, str] = {}
        self.zt: ZtCerts | None = None
        self.certbot_stop = asyncio.Event()
        self.cluster: Cluster | None = None

    async def start(self) -> None:
        cfg = self.cfg
        if cfg.proxy.set_ulimit:
            raise_nofile()
        self.cluster = await build_cluster(cfg)
        store = self.cluster.store
        private, public = wg_keys(cfg)
        node = NodeIdentity(
            node_id=cfg.node_id,
            url=cfg.sync.my_url,
            wg_public_key=public,
            wg_private_key=private,
            wg_ip=str(cfg.wg.network.ip),
            wg_endpoint=cfg.wg.endpoint,
            wg_listen_port=cfg.wg.listen_port,
            uuid=node_uuid(cfg.sync.data_dir),
        )
        table, certs = load_static(cfg.proxy)
        self.device = WgDevice(cfg.wg.interface, str(cfg.wg.network.ip), cfg.wg.config_path)
        await self.device.ensure()
        control = GatewayControl(
            store, table, cfg.wg.network, node, self.device, handshakes=HandshakeCache()
        )
        ctx = GatewayContext(
            control=control,
            table=table,
            base_domain=cfg.proxy.base_domain,
            external_port=cfg.proxy.external_port,
            agent_port=cfg.proxy.agent_port,
            app_address_ns_prefix=cfg.proxy.app_address_ns_prefix,
            verifier=self._verifier(),
            skip_attestation=cfg.skip_attestation,
            webhook=self._webhook(),
            bootnode_url=cfg.sync.bootnode,
            acme_info=self._acme_info,
            exit=self._exit,
            reload_cert=self._reload_cert if cfg.proxy.base_domain or cfg.certbot.enabled else None,
            global_connections=self.cluster.global_connections,
        )
        self.ctx = ctx

        async def acme_json() -> Any:
            return message_to_obj(await self._acme_info())

        self.pool = WorkerPool(cfg.proxy, table, certs, acme_info=acme_json)
        control.publish = self.pool.publish
        if cfg.certbot.enabled:
            # local files when alone, etcd in a cluster (one account, one lock per domain)
            bot = build_certbot(cfg, self.cluster.kv, self.cluster.lock, default_attester(cfg))
            self.zt = ctx.zt = ZtCerts(bot, certs, changed=self._certs_changed, node_id=cfg.node_id)
            try:
                await self.zt.sync()
            except CertbotError as e:
                log.error("the stored certificates are not loaded: %s", e)
        fetcher = PolicyFetcher(
            table,
            cfg.proxy.port_policy_fetch,
            cfg.proxy.agent_port,
            on_fetched=control.policy_fetched,
        )
        table.on_policy_missing = fetcher
        await control.start()
        await self.cluster.attach(control)
        await control.poll_handshakes()
        addrs = await self.pool.start()
        ports = sorted({int(a[1]) for a in addrs})
        self.urls["proxy"] = f"{cfg.proxy.listen_addr}:{','.join(map(str, ports))}"
        await self._serve(ctx)
        self.tasks.append(asyncio.ensure_future(self._poll(control)))
        if cfg.recycle.enabled:
            self.tasks.append(asyncio.ensure_future(self._recycle(control)))
        if self.zt is not None:
            self.tasks.append(asyncio.ensure_future(self.zt.run(self.certbot_stop)))

    def _verifier(self) -> EvidenceVerifier | None:
        a = self.cfg.attestation
        root = None
        if a.root_ca_tdx is not None:
            try:
                root = a.root_ca_tdx.read_bytes()
            except OSError as e:
                raise ConfigError(f"cannot read core.attestation.root_ca.tdx: {e.strerror}") from e
            log.warning("accepting quotes under the external trust anchor %s", a.root_ca_tdx)
        return EvidenceVerifier(CollateralCache(a.pccs_url, a.cache_dir), root_ca_der=root)

    def _webhook(self) -> AuthWebhook | None:
        a = self.cfg.auth
        return AuthWebhook(a.url, a.timeout) if a.enabled else None

    async def _acme_info(self) -> pb.AcmeInfoResponse:
        """the account and the attested keys in the certbot's storage (none without one)."""
        if self.zt is None:
            return pb.AcmeInfoResponse()
        return await self.zt.acme_info()

    async def _certs_changed(self) -> None:
        """the certbot changed the store or the key history: the public facts follow the best
        ZT-domain, and the workers get the new certificates and acme-info."""
        assert self.pool is not None
        best = self.zt.best if self.zt is not None else None
        p = self.cfg.proxy
        self.ctx.base_domain = best.domain if best is not None else p.base_domain
        self.ctx.external_port = best.port if best is not None else p.external_port
        await self.pool.refresh_info()
        await self.pool.publish()

    async def _reload_cert(self) -> None:
        """re-read the legacy static certificate files (``[core.proxy] cert_chain/cert_key``),
        then the certbot's stored certificates."""
        p = self.cfg.proxy
        assert self.pool is not None
        if p.base_domain:
            chain = _read(Path(p.cert_chain), "cert_chain")
            key = _read(Path(p.cert_key), "cert_key")
            try:
                self.pool.certs.set(p.base_domain, chain, key)
            except CertStoreError as e:
                raise ConfigError(f"certificate not reloaded: {e}") from None
            log.info("reloaded the certificate of %s", p.base_domain)
        if self.zt is not None:
            await self.zt.sync()
        await self.pool.publish()

    def _exit(self, force: bool) -> None:
        loop = asyncio.get_running_loop()
        if force:
            loop.call_later(0.2, os._exit, 0)
        loop.call_soon(self.stop.set)

    async def _serve(self, ctx: GatewayContext) -> None:
        cfg = self.cfg

        async def health(_: web.Request) -> web.Response:
            return web.Response(text="OK")

        main = PrpcServer(response_headers=HEADERS, limits=cfg.server_limits)
        self.servers.append(main)
        main.mount(gateway_service(ctx))
        main.app.router.add_get("/health", health)
        ca = _read(cfg.tls.ca_certs, "tls.mutual.ca_certs") if cfg.tls.ca_certs else None
        if ca is None:
            log.warning("no tls.mutual.ca_certs: cvms cannot authenticate, RegisterCvm refuses")
        try:
            port = await main.listen_tls(
                cfg.rpc_address,
                cfg.rpc_port,
                cert_pem=_read(cfg.tls.certs, "tls.certs"),
                key_pem=_read(cfg.tls.key, "tls.key"),
                client_ca_pem=ca,
                require_client_cert=cfg.tls.mandatory,
            )
        except ValueError as e:
            raise ConfigError(f"[tls]: {e}") from None
        self.urls["rpc"] = f"https://{_host(cfg.rpc_address)}:{port}"

        if cfg.admin.enabled:
            admin = PrpcServer(response_headers=HEADERS, limits=cfg.server_limits)
            self.servers.append(admin)
            a = cfg.admin
            htpasswd = Htpasswd.load(a.htpasswd_file) if a.htpasswd_file else None
            if a.auth_token or htpasswd is not None:
                admin.app.middlewares.append(
                    auth_middleware((a.auth_token,), htpasswd, realm="dstack-gateway admin")
                )
            else:
                log.warning("the admin server runs without authentication (insecure_no_auth)")
            for service in admin_services(ctx):
                admin.mount(service)

            async def dashboard(_: web.Request) -> web.Response:
                return web.Response(text=render_dashboard(ctx), content_type="text/html")

            admin.app.router.add_get("/", dashboard)
            aport = await admin.listen_tcp(a.address, a.port)
            self.urls["admin"] = f"http://{_host(a.address)}:{aport}"

        if cfg.debug_enabled:
            debug = PrpcServer(response_headers=HEADERS, limits=cfg.server_limits)
            self.servers.append(debug)
            debug.mount(debug_service(ctx))
            debug.app.router.add_get("/health", health)
            dport = await debug.listen_tcp(cfg.debug_address, cfg.debug_port)
            self.urls["debug"] = f"http://{_host(cfg.debug_address)}:{dport}"
            log.warning("the debug rpc server is enabled: registrations without attestation")

    async def _poll(self, control: GatewayControl) -> None:
        while True:
            await asyncio.sleep(POLL_TICK)
            try:
                await control.poll_handshakes()
            except Exception:
                log.exception("handshake poll failed")

    async def _recycle(self, control: GatewayControl) -> None:
        r = self.cfg.recycle
        while True:
            await asyncio.sleep(r.interval)
            try:
                await control.recycle(r.timeout)
            except Exception:
                log.exception("recycling failed")

    async def close(self) -> None:
        self.certbot_stop.set()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for server in self.servers:
            await server.close()
        if self.pool is not None:
            await self.pool.stop()
        if self.cluster is not None:
            await self.cluster.close()


def _host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


async def run(cfg: GatewayConfig) -> int:
    from pydstack.process import stop_signal

    gateway = Gateway(cfg)
    signalled = stop_signal()
    try:
        await gateway.start()
    except (DstackError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        await gateway.close()
        return 2
    for name in ("admin", "debug"):
        if name in gateway.urls:
            print(f"dstack-gateway {name} on {gateway.urls[name]}", flush=True)
    print(f"dstack-gateway proxy on {gateway.urls['proxy']}", flush=True)
    print(f"dstack-gateway listening on {gateway.urls['rpc']}", flush=True)
    waiters = [asyncio.ensure_future(e.wait()) for e in (signalled, gateway.stop)]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await gateway.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dstack-gateway", description="dstack-gateway: attested tls routing to cvms"
    )
    parser.add_argument("-c", "--config", type=Path, required=True, help="gateway.toml")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = GatewayConfig.load(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # the control plane's servers run on asyncio's own loop (their connection limits need its
    # transports); the relay's worker processes run on uvloop
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(cfg))
    return 130


__all__ = [
    "Gateway",
    "WgError",
    "build_certbot",
    "default_attester",
    "local_certbot_store",
    "main",
    "run",
]

if __name__ == "__main__":
    sys.exit(main())
