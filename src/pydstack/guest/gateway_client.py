"""the CVM side of dstack-gateway (§3.2): register, bring up WireGuard, stay registered.

When the app-compose enables the gateway (``gateway_enabled``, legacy ``tproxy_enabled``) and
sys-config lists ``gateway_urls``, :func:`start` (called by each guest init once its agent
serves) makes a :class:`GatewayClient` that

1. makes a WireGuard key pair and a client certificate (P-256, ``dstack-guest-agent``,
   client-auth, with the app-info extension) signed through the key provider (the KMS signs it
   with the app's CA, so the chain ends at the KMS root the gateway trusts); both are kept for
   the boot, the certificate renewed when less than 10 minutes of it are left;
2. calls ``RegisterCvm`` with its public key and the app-compose's ``port_policy`` on each URL in
   order until one answers (``/prpc`` appended), trusting a gateway only when its certificate
   chains to the KMS root CA (``.appkeys.json`` ``ca_cert``) and names the ``gateway_app_id`` the
   KMS returned (``"any"``: no check at all, as upstream; an empty id refuses every gateway);
3. writes the interface config (0600) and brings ``dstack-wg0`` up in the CVM's own network
   namespace (the kernel module where present, else ``wireguard-go``): ``Address =
   <client_ip>/32``, one peer per gateway with ``AllowedIPs = <its wg ip>/32``, its endpoint and
   keepalive 25, listen port 9182; an input filter lets WireGuard datagrams in only from the
   gateways' endpoints (ip6tables too when an endpoint is IPv6) and tunnel traffic only from the
   gateways' WireGuard addresses. The answer is hostile input (:func:`parse_registration`):
   every value is parsed and written back canonical (endpoints are IP addresses or DNS names,
   which the filter admits as they resolve when the tunnel is set up);
4. serves the agent's read-only ``Info`` and ``Version`` (``/prpc/Info``) on
   ``<client_ip>:<agent internal_port>`` for the gateway's port-policy fetch;
5. re-registers every 10 s check (:class:`KeepAlive`): at once with backoff (30 s doubling to
   120 s) while the config is missing, forced when the newest handshake is older than 180 s,
   and at least every 180 s; each re-registration starts again from the first URL, so a gateway
   that goes away is replaced by the next.

A registration failure is logged and retried; the app boots without a route meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from google.protobuf.empty_pb2 import Empty

from pydstack.attest.ratls import parse_ratls_cert
from pydstack.crypto.certs import load_cert_pem
from pydstack.crypto.wgkeys import (
    WgKeyError,
    check_public_key,
    decode_key,
    generate_private_key,
    public_key_of,
)
from pydstack.errors import DstackError, InputError
from pydstack.rpc.calls import CallContext, Encoded, PrpcService
from pydstack.rpc.client import PrpcClient
from pydstack.rpc.errors import RpcError
from pydstack.rpc.http1 import Http1Server
from pydstack.rpc.proto import agent_rpc_pb2 as apb
from pydstack.rpc.proto import gateway_rpc_pb2 as gpb
from pydstack.types.netaddr import parse_port
from pydstack.types.sysconfig import SysConfig

from .appkeys import AppKeys
from .core import GuestCore
from .service import WORKER, WorkerService

log = logging.getLogger(__name__)

INTERFACE = "dstack-wg0"
LISTEN_PORT = 9182
KEEPALIVE = 25
CHECK_INTERVAL = 10.0
REFRESH_INTERVAL = 180.0
HANDSHAKE_STALE = 180.0
MISSING_BACKOFF = (30.0, 120.0)
CERT_VALIDITY = 10 * 24 * 3600
CERT_MIN_LEFT = 600
DEFAULT_AGENT_PORT = 8090
#: how long one RegisterCvm may take
REGISTER_TIMEOUT = 30.0
CHAIN_UDP, CHAIN_IN = "DSTACK_WG", "DSTACK_WG_IN"

Notify = Callable[[str, str], Awaitable[None]]


class GatewayClientError(DstackError):
    """the CVM cannot register with any gateway, or cannot set up its tunnel."""


def gateway_enabled(compose: Mapping[str, Any]) -> bool:
    return compose.get("gateway_enabled") is True or compose.get("tproxy_enabled") is True


def port_policy_message(compose: Mapping[str, Any]) -> gpb.PortPolicy:
    """the app-compose's ``port_policy`` as RegisterCvm sends it (absent: open, nothing
    listed). InputError for ports outside 1..65535 or a malformed policy."""
    raw = compose.get("port_policy")
    if raw is None:
        return gpb.PortPolicy(restrict_mode=False)
    if not isinstance(raw, Mapping):
        raise InputError("app-compose port_policy must be an object")
    restrict = raw.get("restrict_mode", False)
    ports = raw.get("ports") or []
    if not isinstance(restrict, bool) or not isinstance(ports, list) or len(ports) > 1024:
        raise InputError("app-compose port_policy is malformed")
    out = gpb.PortPolicy(restrict_mode=restrict)
    for item in ports:
        port = item.get("port") if isinstance(item, Mapping) else None
        pp = item.get("pp", False) if isinstance(item, Mapping) else None
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise InputError(f"app-compose port_policy port {port!r} is not in 1..65535")
        if not isinstance(pp, bool):
            raise InputError("app-compose port_policy pp must be a boolean")
        out.ports.append(gpb.PortAttrs(port=port, pp=pp))
    return out


def gateway_check(allowed_app_id: str) -> Callable[[x509.Certificate], None]:
    """the check of a gateway's server certificate (after its chain verified): its app id
    extension must be `allowed_app_id` (hex, case-insensitive; a comma-separated list allows
    several)."""
    allowed = {a.strip().lower().removeprefix("0x") for a in allowed_app_id.split(",")}
    allowed.discard("")

    def check(cert: x509.Certificate) -> None:
        try:
            app_id = parse_ratls_cert(cert).app_id
        except DstackError as e:
            raise RpcError(f"gateway certificate is malformed: {e}") from None
        if app_id is None:
            raise RpcError("gateway certificate names no app id")
        if app_id.hex() not in allowed:
            raise RpcError(f"gateway app id {app_id.hex()} is not the allowed one")

    return check


def rpc_base(url: str) -> str:
    return url.rstrip("/").removesuffix("/prpc")


#: the most gateways one RegisterCvm answer may name (a cluster is a handful of nodes)
MAX_GATEWAYS = 64


@dataclass(frozen=True)
class Peer:
    """one gateway as the CVM's WireGuard config names it, every field canonical (rendered from
    parsed values, never copied from the answer)."""

    public_key: str
    ip: str
    endpoint: str

    @property
    def host(self) -> str:
        """the endpoint's address, without brackets or port."""
        return self.endpoint.rpartition(":")[0].strip("[]")


@dataclass(frozen=True)
class Registration:
    """what a RegisterCvm answer gives the CVM, checked: its tunnel address, the gateways, and the
    port its agent's Info is served on for the gateway."""

    client_ip: str
    peers: list[Peer]
    agent_port: int


def _port(text: str) -> int:
    port = parse_port(text)
    if port is None:
        raise ValueError(f"bad port {text[:16]!r}")
    return port


#: a DNS name as an endpoint may give it: letters, digits and inner hyphens, dot-separated
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*")


def _endpoint(text: str) -> str:
    """``<ipv4>:<port>``, ``[<ipv6>]:<port>`` or ``<dns name>:<port>``, canonical (a name
    lower-cased, letters, digits, hyphens and dots only). No IPv6 scope. The endpoint's
    address, or the addresses its name resolves to, is the source the input filter admits."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError("endpoint without a port")
    number = _port(port)
    if host.startswith("[") and host.endswith("]"):
        ip6 = ipaddress.IPv6Address(host[1:-1])
        if ip6.scope_id is not None:
            raise ValueError("endpoint with an ipv6 scope")
        return f"[{ip6}]:{number}"
    try:
        return f"{ipaddress.IPv4Address(host)}:{number}"
    except ValueError:
        pass
    name = host.lower()
    if not host.isascii() or not _HOSTNAME.fullmatch(name) or name.replace(".", "").isdigit():
        raise ValueError(f"bad endpoint host {host[:64]!r}")
    return f"{name}:{number}"


async def filter_sources(hosts: Sequence[str]) -> tuple[list[str], list[str]]:
    """the IPv4 and IPv6 addresses of endpoint hosts (addresses as they are, names resolved).
    GatewayClientError for a name that does not resolve."""
    v4: list[str] = []
    v6: list[str] = []
    loop = asyncio.get_running_loop()
    for host in hosts:
        try:
            ips = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = await loop.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
            except OSError as e:
                raise GatewayClientError(f"cannot resolve gateway endpoint {host}: {e}") from None
            ips = [ipaddress.ip_address(str(info[4][0])) for info in infos]
        for ip in ips:
            out = v4 if ip.version == 4 else v6
            if str(ip) not in out:
                out.append(str(ip))
    return v4, v6


def _peer(s: gpb.WireGuardPeer) -> Peer:
    key = decode_key(check_public_key(s.pk), "public key")  # written back canonical
    ip = ipaddress.IPv4Interface(s.ip).ip
    return Peer(base64.b64encode(key).decode(), str(ip), _endpoint(s.endpoint))


def parse_registration(resp: gpb.RegisterCvmResponse) -> Registration:
    """the checked content of a RegisterCvm answer. Every value that reaches the WireGuard config,
    a command line or a listener is parsed and written back from the parsed value, so an answer
    (from a gateway, or from whoever answers when ``gateway_app_id`` is ``"any"``) cannot add a
    line to the config or an argument to a command. GatewayClientError for a malformed answer,
    none or more than :data:`MAX_GATEWAYS` gateways, or a key named twice."""
    servers = resp.wg.servers
    if not servers:
        raise GatewayClientError("the gateway sent no wireguard peers")
    if len(servers) > MAX_GATEWAYS:
        raise GatewayClientError(f"the gateway sent more than {MAX_GATEWAYS} wireguard peers")
    peers = []
    for s in servers:
        try:
            peers.append(_peer(s))
        except (ValueError, WgKeyError) as e:
            raise GatewayClientError(f"the gateway sent a malformed peer: {e}") from None
    if len({p.public_key for p in peers}) != len(peers):
        raise GatewayClientError("the gateway sent one wireguard key twice")
    try:
        client_ip = str(ipaddress.IPv4Address(resp.wg.client_ip))
    except ValueError:
        raise GatewayClientError("the gateway sent a malformed client ip") from None
    port = resp.agent.internal_port or DEFAULT_AGENT_PORT
    if port > 65535:
        raise GatewayClientError("the gateway sent a malformed agent port")
    return Registration(client_ip, sorted(peers, key=lambda p: p.public_key), port)


def render_cvm_config(private_key: str, client_ip: str, peers: Sequence[Peer]) -> str:
    """the interface config (wg-quick form, with ``Address``)."""
    lines = [
        "[Interface]",
        f"PrivateKey = {private_key}",
        f"ListenPort = {LISTEN_PORT}",
        f"Address = {client_ip}/32",
        "",
    ]
    for p in peers:
        lines += [
            "[Peer]",
            f"PublicKey = {p.public_key}",
            f"AllowedIPs = {p.ip}/32",
            f"Endpoint = {p.endpoint}",
            f"PersistentKeepalive = {KEEPALIVE}",
            "",
        ]
    return "\n".join(lines)


def strip_address(config: str) -> str:
    """the config without wg-quick's ``Address`` line (what ``wg setconf`` reads)."""
    return "\n".join(line for line in config.splitlines() if not line.startswith("Address"))


@dataclass
class KeepAlive:
    """when to register again (§3.2), from the clock and what the tunnel reports."""

    clock: Callable[[], float] = time.monotonic
    last_ok: float | None = None
    next_retry: float = 0.0
    backoff: float = MISSING_BACKOFF[0]

    def decide(self, config_present: bool, handshake_age: float) -> str | None:
        """ "register", "force" or None. `handshake_age`: seconds since the newest handshake
        (infinity when there was none)."""
        now = self.clock()
        if now < self.next_retry:
            return None
        if not config_present or self.last_ok is None:
            return "force"
        since = now - self.last_ok
        if handshake_age > HANDSHAKE_STALE and since >= HANDSHAKE_STALE:
            return "force"
        if since >= REFRESH_INTERVAL:
            return "register"
        return None

    def succeeded(self) -> None:
        self.last_ok = self.clock()
        self.backoff = MISSING_BACKOFF[0]

    def failed(self) -> None:
        self.next_retry = self.clock() + self.backoff
        self.backoff = min(self.backoff * 2, MISSING_BACKOFF[1])


async def run_cmd(*args: str, check: bool = True, daemon: bool = False) -> str:
    """stdout of a command (GatewayClientError with its stderr when `check` and it fails)."""
    if shutil.which(args[0]) is None:
        raise GatewayClientError(f"{args[0]} is not installed in this cvm")
    pipe = asyncio.subprocess.DEVNULL if daemon else asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=pipe, stderr=pipe
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    if check and proc.returncode != 0:
        why = (err or b"").decode(errors="replace").strip()[-300:]
        raise GatewayClientError(f"{' '.join(args[:4])}: {why or proc.returncode}")
    return (out or b"").decode(errors="replace")


class CvmWireGuard:
    """``dstack-wg0`` in this CVM's network namespace."""

    def __init__(self, config_path: Path, interface: str = INTERFACE) -> None:
        self.config_path = config_path
        self.interface = interface

    def present(self) -> bool:
        return self.config_path.exists()

    async def apply(self, config: str, client_ip: str, peers: Sequence[Peer]) -> None:
        """(re)create the interface with `config` and its input filter."""
        _write_private(self.config_path, config)
        setconf = self.config_path.with_suffix(".setconf")
        _write_private(setconf, strip_address(config))
        try:
            await run_cmd("ip", "link", "del", self.interface, check=False)
            try:
                await run_cmd("ip", "link", "add", self.interface, "type", "wireguard")
            except GatewayClientError:
                await run_cmd("wireguard-go", self.interface, daemon=True)
            await run_cmd("wg", "setconf", self.interface, str(setconf))
        finally:
            setconf.unlink(missing_ok=True)
        await self._filter(peers)
        await run_cmd("ip", "address", "replace", f"{client_ip}/32", "dev", self.interface)
        await run_cmd("ip", "link", "set", self.interface, "up")
        for p in peers:
            await run_cmd("ip", "route", "replace", f"{p.ip}/32", "dev", self.interface)

    async def _filter(self, peers: Sequence[Peer]) -> None:
        v4, v6 = await filter_sources([p.host for p in peers])
        await self._filter_family(("iptables", "-w"), v4, [p.ip for p in peers])
        if v6:  # only then, so a guest without ip6tables still reaches IPv4 gateways
            await self._filter_family(("ip6tables", "-w"), v6, [])

    async def _filter_family(
        self, ipt: tuple[str, ...], hosts: Sequence[str], tunnel_ips: Sequence[str]
    ) -> None:
        """one address family's chains: WireGuard datagrams only from `hosts`, tunnel traffic
        only from `tunnel_ips`."""
        for chain in (CHAIN_UDP, CHAIN_IN):
            await run_cmd(*ipt, "-N", chain, check=False)
            await run_cmd(*ipt, "-F", chain)
        jumps = (
            ("INPUT", "-p", "udp", "--dport", str(LISTEN_PORT), "-j", CHAIN_UDP),
            ("INPUT", "-i", self.interface, "-j", CHAIN_IN),
        )
        for jump in jumps:
            while await _ok(*ipt, "-D", *jump):
                pass
            await run_cmd(*ipt, "-I", *jump)
        for host in hosts:
            await run_cmd(*ipt, "-A", CHAIN_UDP, "-s", host, "-j", "ACCEPT")
        for ip in tunnel_ips:
            await run_cmd(*ipt, "-A", CHAIN_IN, "-s", ip, "-j", "ACCEPT")
        await run_cmd(*ipt, "-A", CHAIN_UDP, "-j", "DROP")
        await run_cmd(*ipt, "-A", CHAIN_IN, "-j", "DROP")

    async def newest_handshake(self) -> float | None:
        try:
            out = await run_cmd("wg", "show", self.interface, "latest-handshakes")
        except GatewayClientError:
            return None
        stamps = [int(p[1]) for p in (ln.split() for ln in out.splitlines()) if len(p) == 2]
        return float(max(stamps)) if stamps else None


async def _ok(*args: str) -> bool:
    try:
        await run_cmd(*args)
    except GatewayClientError:
        return False
    return True


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class InfoOnly:
    """the agent's read-only Worker methods the gateway may ask on the tunnel."""

    def __init__(self, core: GuestCore) -> None:
        self._worker = WorkerService(core)

    async def Info(self, req: Empty, ctx: CallContext) -> Encoded:
        return await self._worker.Info(req, ctx)

    async def Version(self, req: Empty, ctx: CallContext) -> apb.WorkerVersion:
        return await self._worker.Version(req, ctx)


@dataclass
class _Credentials:
    wg_private: str
    wg_public: str
    cert_chain: list[str] = field(default_factory=list)
    cert_key: str = ""
    cert_not_after: float = 0.0


class GatewayClient:
    """this CVM's registration with its gateways."""

    def __init__(
        self,
        core: GuestCore,
        keys: AppKeys,
        sys_config: SysConfig,
        *,
        wg: CvmWireGuard,
    ) -> None:
        self.core = core
        self.keys = keys
        self.urls = list(sys_config.gateway_urls)
        self.wg = wg
        self.keepalive = KeepAlive()
        self._creds: _Credentials | None = None
        self._config = ""
        self._agent: Http1Server | None = None
        self._agent_at: tuple[str, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._first: asyncio.Task[None] | None = None
        #: the gateway that answered last, and its answer
        self.gateway_url = ""
        self.client_ip = ""

    # ------------------------------------------------------------------ credentials
    async def _credentials(self) -> _Credentials:
        creds = self._creds
        if creds is None:
            private = generate_private_key()
            creds = self._creds = _Credentials(private, public_key_of(private))
        if creds.cert_not_after - time.time() < CERT_MIN_LEFT:
            now = int(time.time())
            key, chain = await asyncio.to_thread(
                self.core.get_tls_key,
                "dstack-guest-agent",
                (),
                usage_ra_tls=False,
                usage_server_auth=False,
                usage_client_auth=True,
                with_app_info=True,
                not_before=now - 60,
                not_after=now + CERT_VALIDITY,
            )
            creds.cert_key, creds.cert_chain = key, chain
            creds.cert_not_after = load_cert_pem(chain[0]).not_valid_after_utc.timestamp()
        return creds

    def _client(self, url: str, creds: _Credentials) -> PrpcClient:
        allowed = self.keys.gateway_app_id
        if not allowed:
            raise GatewayClientError("the kms named no gateway app id: no gateway is trusted")
        if allowed == "any":
            log.warning('gateway_app_id is "any": the gateway\'s certificate is not checked')
            return PrpcClient(
                rpc_base(url),
                prefix="/prpc",
                timeout=REGISTER_TIMEOUT,
                client_cert_pem="".join(creds.cert_chain),
                client_key_pem=creds.cert_key,
                verify_server=lambda _cert: None,
            )
        return PrpcClient(
            rpc_base(url),
            prefix="/prpc",
            timeout=REGISTER_TIMEOUT,
            client_cert_pem="".join(creds.cert_chain),
            client_key_pem=creds.cert_key,
            ca_pem=self.keys.ca_cert,
            verify_server=gateway_check(allowed),
        )

    # ------------------------------------------------------------------ registration
    async def register(self, *, force: bool) -> str:
        """register with the first gateway that answers and apply its config; the gateway's
        url. GatewayClientError naming each gateway's failure when none does."""
        creds = await self._credentials()
        request = gpb.RegisterCvmRequest(client_public_key=creds.wg_public)
        request.port_policy.CopyFrom(port_policy_message(self.core.app_compose))
        errors = []
        for url in self.urls:
            try:
                async with self._client(url, creds) as client:
                    resp = await client.call("RegisterCvm", request, gpb.RegisterCvmResponse)
                reg = parse_registration(resp)
            except (DstackError, OSError, TimeoutError) as e:
                errors.append(f"{url}: {e or type(e).__name__}")
                log.warning("registering with gateway %s failed: %s", url, e)
                continue
            except Exception as e:  # a malformed url and anything else: try the next gateway
                errors.append(f"{url}: {type(e).__name__}: {e}")
                log.warning("registering with gateway %s failed: %s", url, e)
                continue
            await self._apply(creds, reg, force=force)
            self.gateway_url = url
            return url
        raise GatewayClientError("no gateway accepted the registration: " + "; ".join(errors))

    async def _apply(self, creds: _Credentials, reg: Registration, *, force: bool) -> None:
        config = render_cvm_config(creds.wg_private, reg.client_ip, reg.peers)
        if force or config != self._config or not self.wg.present():
            await self.wg.apply(config, reg.client_ip, reg.peers)
            self._config = config
            log.info("wireguard up: %s via %d gateway(s)", reg.client_ip, len(reg.peers))
        self.client_ip = reg.client_ip
        await self._serve_agent(reg.client_ip, reg.agent_port)

    async def _serve_agent(self, ip: str, port: int) -> None:
        if self._agent_at == (ip, port):
            return
        if self._agent is not None:
            await self._agent.close()
            self._agent = None
        server = Http1Server()
        server.mount(PrpcService(WORKER, InfoOnly(self.core), prefix="/prpc/", trim="Worker."))
        await server.listen_tcp(ip, port)
        self._agent, self._agent_at = server, (ip, port)
        log.info("agent info served on %s:%d for the gateway", ip, port)

    # ------------------------------------------------------------------ keep-alive
    async def check(self) -> None:
        """one keep-alive step (§3.2)."""
        present = self.wg.present() and bool(self._config)
        newest = await self.wg.newest_handshake() if present else None
        age = time.time() - newest if newest else float("inf")
        decision = self.keepalive.decide(present, age)
        if decision is None:
            return
        try:
            await self.register(force=decision == "force")
        except (DstackError, OSError) as e:
            self.keepalive.failed()
            log.warning("gateway registration failed: %s", e)
            return
        self.keepalive.succeeded()

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(CHECK_INTERVAL)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self.run())

    async def first_registration(self) -> None:
        """register once (a failure is logged: the keep-alive loop retries), then keep alive."""
        try:
            url = await self.register(force=True)
            self.keepalive.succeeded()
            log.info("registered with dstack-gateway %s as %s", url, self.client_ip)
        except (DstackError, OSError) as e:
            self.keepalive.failed()
            log.warning("dstack-gateway registration failed (the app has no route yet): %s", e)
        self.start()

    def begin(self) -> None:
        """start the first registration (and after it the keep-alive loop) in the background."""
        self._first = asyncio.ensure_future(self.first_registration())

    async def ready(self) -> None:
        """wait for the first registration `begin` started (a failed one counts: the
        keep-alive loop retries it)."""
        if self._first is not None:
            await asyncio.shield(self._first)

    async def close(self) -> None:
        for task in (self._first, self._task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._agent is not None:
            await self._agent.close()


async def start(
    core: GuestCore,
    keys: AppKeys,
    sys_config: SysConfig,
    notify: Notify | None = None,
    *,
    run_dir: Path = Path("/run/dstack"),
    wait: bool = True,
) -> GatewayClient | None:
    """the gateway client of this CVM, registered once (or retrying in the background), or
    None when the app does not use a gateway. With `wait=False` the first registration runs
    while the caller goes on (a boot pulls the app's images meanwhile), and `ready()` waits
    for it."""
    if not gateway_enabled(core.app_compose):
        return None
    if not sys_config.gateway_urls:
        log.warning("the app enables the gateway but sys-config lists no gateway_urls")
        return None
    client = GatewayClient(
        core, keys, sys_config, wg=CvmWireGuard(run_dir / "wireguard" / f"{INTERFACE}.conf")
    )
    if notify is not None:
        await notify("boot.progress", "setting up dstack-gateway")
    if wait:
        await client.first_registration()
    else:
        client.begin()
    return client
