"""a local dstack on one machine: mock PCCS, KMS, dstack-vmm and (optionally) dstack-gateway as
real processes.

Used by the main job (`pydstack.demo`), the VMM benchmarks and the end-to-end tests. Everything
lives under one directory: `kms.toml`, `allow.json` (the KMS's auth-simple allowlist),
`vmm.toml`, the run path, the images and each process's log.

The stack keeps to this host: its mock attestation seed is random per stack (`seed`, 0600,
kept across restarts of the same directory; only the VMM and the mock PCCS read it), the
configuration files are 0600, the PCCS and the VMM listen on loopback and the KMS on the CVM
bridge's host address only (CVMs reach it there, and so does the host; nothing else does).

With `gateway=True` the stack also runs dstack-gateway (:mod:`pydstack.devgateway`: its rpc
certificate from the KMS's app CA for a gateway app id the KMS allowlist names, a wildcard
`*.dstack.localhost` from a local CA for the proxy): its RPC on the bridge address, WireGuard on
a UDP port of the host (its interface named after the bridge, in `100.100.<n>.0/24`), the proxy
and the admin API on loopback; the VMM gives CVMs its URL and opens its UDP port to them.
With `acme=True` too, the proxy's certificate comes from a local ACME server instead: the stack
runs pebble and a bind9 for the base domain (loopback), and configures a ZT-domain through the
gateway's admin API, whose certbot orders the wildcard by DNS-01 (RFC 2136 to the bind9);
clients trust pebble's root (`gateway_ca`), and :meth:`DevStack.wait_gateway_cert` waits until
the gateway serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from pydstack import devgateway, devregistry
from pydstack.apps.image import ImageError, push_image
from pydstack.certbot.devdns import DevBind, DevPebble
from pydstack.errors import DstackError
from pydstack.gateway.main import CERTBOT_LOCKS, CERTBOT_STORE
from pydstack.rpc.proto import vmm_rpc_pb2
from pydstack.rpc.sync_client import PrpcCallError, PrpcUnreachable, SyncPrpcClient
from pydstack.vmm.app import rmtree_vm_dir
from pydstack.vmm.backends.qemu.backend import STATE_FILE as QEMU_STATE
from pydstack.vmm.backends.qemu.backend import is_qemu_of
from pydstack.vmm.backends.qemu.image_cache import IMAGE_NAMES, install_image
from pydstack.vmm.backends.sandbox.cgroups import remove_cgroup
from pydstack.vmm.backends.sandbox.config import SandboxConfig
from pydstack.vmm.backends.sandbox.image import sandbox_image_digest
from pydstack.vmm.backends.sandbox.launcher import is_launcher
from pydstack.vmm.backends.sandbox.network import (
    ensure_bridge,
    names_for,
    teardown_bridge,
    teardown_network,
)

SEED_FILE = "seed"
#: the repository of the stack's registry holding OS images
OS_IMAGE_REPO = "dstack/guest"
VMM_SERVICE = vmm_rpc_pb2.DESCRIPTOR.services_by_name["Vmm"]


class StackError(DstackError):
    """a component of the local stack failed to start."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        # own session: a ctrl-c meant for the caller must not kill the stack under it, the
        # caller tears it down in order (cvms first)
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_line(
    proc: subprocess.Popen[bytes], log: Path, marker: str, timeout: float, offset: int = 0
) -> str:
    """the first line containing `marker` written to `log` past `offset`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        for line in text.splitlines():
            if marker in line:
                return line
        if proc.poll() is not None:
            raise StackError(f"{log.stem} exited: {text[-2000:]}")
        time.sleep(0.1)
    raise StackError(f"{log.stem} did not print {marker!r} within {timeout:.0f} s")


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes] | None
    log: Path

    def stop(self, timeout: float = 15) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def _runs_in(pid: int, directory: Path) -> bool:
    """whether `pid` is a live process naming `directory` on its command line (a stack's
    processes all do: their configs live there), not a reused pid."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z" and str(directory).encode() in cmd


def _stop_group(pid: int, timeout: float = 15) -> None:
    """SIGTERM the process group `pid` leads (each stack process has its own session), then
    SIGKILL it if it is still there after `timeout` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def write_allowlist(
    path: Path, apps: dict[str, list[str]], os_images: list[str], gateway_app_id: str = ""
) -> None:
    """auth-simple's allowlist: these app ids may boot with these compose hashes (hex), and
    trust the gateway of this app id."""
    doc = {
        "gatewayAppId": gateway_app_id,
        "osImages": os_images,
        "allowedTcbStatuses": ["UpToDate"],
        "kms": {"mrAggregated": [], "allowAnyDevice": True},
        "apps": {a: {"composeHashes": h, "allowAnyDevice": True} for a, h in apps.items()},
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)


def write_private(path: Path, text: str) -> None:
    """write a file only its owner may read (configs naming keys and seeds)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT


def stack_seed(d: Path) -> Path:
    """the stack's mock attestation seed file: random, 0600, made once per stack directory."""
    path = d / SEED_FILE
    if not path.exists():
        write_private(path, os.urandom(32).hex())
    os.chmod(path, 0o600)
    return path


def kms_toml(d: Path, address: str, port: int, pccs_url: str, root: Path, allow: Path) -> str:
    return f"""# local kms for the dev stack
[rpc]
address = "{address}"
port = {port}

[core]
cert_dir = "{d / "kms-certs"}"
# this kms runs on the host, not in a CVM: it cannot attest itself
enforce_self_authorization = false
attest_rpc_cert = false

[core.image]
# the vmm's images: a cvm gets keys only if its quote is what the image it claims measures
verify = true
cache_dir = "{d / "images"}"

[core.onboard]
auto_bootstrap_domain = "kms.local"

[core.attestation]
insecure_allow_external_trust_anchors = true
cache_dir = "{d / "kms-collateral"}"

[core.attestation.urls]
pccs = "{pccs_url}"

[core.attestation.root_ca]
tdx = "{root}"

[core.auth_api]
type = "simple"

[core.auth_api.simple]
config = "{allow}"
"""


def vmm_toml(
    d: Path,
    port: int,
    kms_url: str,
    cvm_kms_url: str,
    seed_file: Path,
    *,
    auth_token: str = "",
    auto_restart: bool = False,
    restart_backoff: float = 5.0,
    bridge: str = "dstack0",
    subnet: str = "10.213.0.0/16",
    registry: str = "",
    backend: str = "sandbox",
    boot_timeout: float = 300.0,
    gateway_url: str = "",
    wireguard_port: int = 0,
    gateway_base_domain: str = "",
    gateway_port: int = 0,
) -> str:
    """the stack's vmm.toml; `registry` (`host:port`, plain http) is the CVMs' docker.io mirror
    and holds the OS images (`dstack/guest`); `gateway_url` the gateway CVMs register with
    (its WireGuard on udp `wireguard_port`). `backend`: sandbox or qemu (QEMU's user-mode
    network reaches the KMS, registry and gateway on the bridge address through the host)."""
    auth = f'\n[auth]\nenabled = true\ntokens = ["{auth_token}"]\n' if auth_token else ""
    gw_urls = f'"{gateway_url}"' if gateway_url else ""
    gw_section = (
        f'\n[gateway]\nbase_domain = "{gateway_base_domain}"\nport = {gateway_port}\n'
        if gateway_url
        else ""
    )
    qemu = (
        f'\n[cvm.qemu]\naccel = "auto"\nboot_timeout = {boot_timeout}\n'
        if backend == "qemu"
        else ""
    )
    return f"""# local dstack-vmm for the dev stack
address = "tcp:127.0.0.1:{port}"
kms_url = "{kms_url}"
run_path = "{d / "run" / "vm"}"

[image]
path = "{d / "images"}"
registry = "{f"http://{registry}/{OS_IMAGE_REPO}" if registry else ""}"

[cvm]
backend = "{backend}"
kms_urls = ["{cvm_kms_url}"]
gateway_urls = [{gw_urls}]
docker_registry = "{f"http://{registry}" if registry else ""}"

[cvm.port_mapping]
enabled = true
address = "127.0.0.1"
range = [
    {{ protocol = "tcp", from = 1024, to = 65535 }},
    {{ protocol = "udp", from = 1024, to = 65535 }},
]

[cvm.auto_restart]
enabled = {str(auto_restart).lower()}
initial_backoff = {restart_backoff}

[cvm.tee_simulator]
mock_attestation_seed_file = "{seed_file}"

[cvm.sandbox]
bridge = "{bridge}"
subnet = "{subnet}"
scrypt_n = 10
wireguard_ports = [{wireguard_port or 51820}]
{qemu}{auth}{gw_section}"""


@dataclass
class DevStack:
    dir: Path
    auth_token: str = ""
    auto_restart: bool = False
    restart_backoff: float = 5.0
    #: a separate bridge and subnet per stack keep concurrent stacks apart
    bridge: str = "dstack0"
    subnet: str = "10.213.0.0/16"
    procs: dict[str, Proc] = field(default_factory=dict)
    kms_url: str = ""
    vmm_url: str = ""
    pccs_url: str = ""
    #: the stack's image registry as cvms reach it, `host:port` on the bridge address (plain
    #: http, read-only), and where the host pushes, on loopback (same storage)
    registry: str = ""
    registry_push: str = ""
    #: the CVM backend: sandbox, or qemu with `qemu_image` (a built guest image directory,
    #: installed into the stack's images as `pydstack-qemu-<flavour>`)
    backend: str = "sandbox"
    qemu_image: Path | None = None
    boot_timeout: float = 300.0

    @property
    def os_images(self) -> list[str]:
        """the os image hashes the KMS's allowlist admits: the images this stack boots."""
        images = [sandbox_image_digest()]
        if self.qemu_image is not None:
            images.append((self.qemu_image / "digest.txt").read_text().strip())
        return images

    @property
    def image_name(self) -> str:
        """the image a deploy on this stack names."""
        if self.backend == "qemu":
            return IMAGE_NAMES["dev"]
        return "pydstack-sandbox"

    #: run dstack-gateway too (CVMs of gateway-enabled apps register with it)
    gateway: bool = False
    #: the gateway's rpc url as cvms reach it, its admin api, admin token and proxy port
    gateway_url: str = ""
    gateway_admin: str = ""
    gateway_admin_token: str = ""
    gateway_proxy_port: int = 0
    gateway_wg_port: int = 0
    #: the gateway's certificate from pebble by DNS-01 through bind9 (else the stack's CA)
    acme: bool = False
    devdns: tuple[DevBind, DevPebble] | None = None

    @property
    def allowlist(self) -> Path:
        return self.dir / "allow.json"

    @property
    def root_ca(self) -> Path:
        return self.dir / "mock-root-ca.der"

    @property
    def vmm_config(self) -> Path:
        return self.dir / "vmm.toml"

    @property
    def seed_file(self) -> Path:
        return self.dir / SEED_FILE

    @property
    def host_ip(self) -> str:
        """the host's address on this stack's cvm bridge."""
        return SandboxConfig(subnet=self.subnet).host_ip

    @property
    def gateway_files(self) -> devgateway.GatewayFiles:
        return devgateway.GatewayFiles(self.dir / "gateway")

    @property
    def gateway_ca(self) -> Path:
        """what a client verifies the gateway's proxy certificate against: pebble's issuing
        root with `acme`, else the stack's proxy CA."""
        files = self.gateway_files
        return files.acme_root if self.acme else files.proxy_ca

    @property
    def gateway_app_id(self) -> str:
        return self.gateway_files.app_id() if self.gateway else ""

    @property
    def gateway_interface(self) -> str:
        return devgateway.interface_for(self.bridge)

    @property
    def base_domain(self) -> str:
        return devgateway.BASE_DOMAIN

    @property
    def pid_dir(self) -> Path:
        return self.dir / "pids"

    def _track(self, name: str, proc: subprocess.Popen[bytes], log: Path) -> Proc:
        """remember a process of the stack, in memory and in `pids/<name>.pid` (so a later run
        can stop it if this one is killed before it could)."""
        self.pid_dir.mkdir(exist_ok=True)
        (self.pid_dir / f"{name}.pid").write_text(str(proc.pid))
        self.procs[name] = Proc(name, proc, log)
        return self.procs[name]

    def _forget(self, name: str) -> None:
        if name in self.procs:
            self.procs[name].stop()
        (self.pid_dir / f"{name}.pid").unlink(missing_ok=True)

    def clean_leftovers(self) -> list[str]:
        """stop what an earlier run in this directory left behind when it was killed before it
        could stop it: its processes (recorded pids still running with this directory on their
        command line), its cvms (launchers, network namespaces, cgroups) and their vm
        directories, so the next start begins from nothing. Returns what it stopped."""
        stopped: list[str] = []
        for pid_file in sorted(self.pid_dir.glob("*.pid")) if self.pid_dir.is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text())
                if _runs_in(pid, self.dir):
                    _stop_group(pid)
                    stopped.append(pid_file.stem)
            pid_file.unlink(missing_ok=True)
        if self.gateway and devgateway.remove_interface(self.gateway_interface):
            stopped.append(f"interface {self.gateway_interface}")
        vm_root = self.dir / "run" / "vm"
        vm_dirs = [p for p in vm_root.iterdir() if p.is_dir()] if vm_root.is_dir() else []
        if vm_dirs:
            self._kill_leftover_cvms()
            for vm_dir in vm_dirs:
                asyncio.run(remove_cgroup(vm_dir))
                rmtree_vm_dir(vm_dir)
                stopped.append(f"vm {vm_dir.name}")
        return stopped

    def start(self, progress: IO[str] | None = None) -> DevStack:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)

        def say(msg: str) -> None:
            if progress is not None:
                print(msg, file=progress, flush=True)

        left = self.clean_leftovers()
        if left:
            say(f"stopped what an earlier run left behind: {', '.join(left)}")
        py = sys.executable
        seed_file = stack_seed(d)
        # the kms and the registry listen on the bridge only: create it before the vmm does
        ensure_bridge(self.bridge, self.subnet)
        self.registry_push = f"127.0.0.1:{free_port()}"
        self.registry = f"{self.host_ip}:{free_port()}"
        reg_log = d / "registry.log"
        try:
            push = devregistry.start(d / "registry", self.registry_push, reg_log)
            self._track("registry", push, reg_log)
            pull = devregistry.start(d / "registry", self.registry, reg_log, readonly=True)
            self._track("registry-ro", pull, reg_log)
        except devregistry.RegistryStartError as e:
            raise StackError(str(e)) from e
        say(f"image registry: push to {self.registry_push}, cvms pull from {self.registry}")
        pccs_port = free_port()
        self._track(
            "pccs",
            _spawn(
                [
                    py, "-m", "pydstack.tee.collateral_server", "--seed-file", str(seed_file),
                    "--listen", f"127.0.0.1:{pccs_port}", "--root-out", str(self.root_ca),
                ],
                d / "pccs.log",
            ),
            d / "pccs.log",
        )  # fmt: skip
        _wait_line(self.procs["pccs"].proc, d / "pccs.log", "serving", 30)  # type: ignore[arg-type]
        self.pccs_url = f"http://127.0.0.1:{pccs_port}"
        say(f"mock pccs on {self.pccs_url}")

        if self.qemu_image is not None:
            install_image(self.qemu_image, d / "images")
        if not self.allowlist.exists() or self.gateway:
            apps = {}
            with contextlib.suppress(OSError, ValueError, AttributeError):
                apps = {
                    k: list(v.get("composeHashes", []))
                    for k, v in json.loads(self.allowlist.read_text()).get("apps", {}).items()
                }
            self.allow(apps)
        kms_port = free_port()
        write_private(
            d / "kms.toml",
            kms_toml(d, self.host_ip, kms_port, self.pccs_url, self.root_ca, self.allowlist),
        )
        self.start_kms()
        say(f"kms on {self.kms_url}")

        wg_port = 0
        if self.gateway:
            wg_port = self.start_gateway()
            say(f"dstack-gateway on {self.gateway_url} (admin {self.gateway_admin})")
        vmm_port = free_port()
        write_private(
            self.vmm_config,
            vmm_toml(
                d,
                vmm_port,
                self.kms_url,
                self.kms_url,
                seed_file,
                auth_token=self.auth_token,
                auto_restart=self.auto_restart,
                restart_backoff=self.restart_backoff,
                bridge=self.bridge,
                subnet=self.subnet,
                registry=self.registry,
                backend=self.backend,
                boot_timeout=self.boot_timeout,
                gateway_url=self.gateway_url,
                wireguard_port=wg_port,
                gateway_base_domain=self.base_domain,
                gateway_port=self.gateway_proxy_port,
            ),
        )
        self.vmm_url = f"http://127.0.0.1:{vmm_port}"
        self.start_vmm()
        say(f"dstack-vmm on {self.vmm_url}")
        return self

    def start_kms(self) -> None:
        log = self.dir / "kms.log"
        offset = log.stat().st_size if log.exists() else 0
        proc = _spawn(
            [sys.executable, "-m", "pydstack.kms.main", "-c", str(self.dir / "kms.toml")], log
        )
        self._track("kms", proc, log)
        line = _wait_line(proc, log, "dstack-kms listening on", 60, offset)
        self.kms_url = line.split()[-1]

    def start_gateway(self, *, restart: bool = False) -> int:
        """dstack-gateway (certificates issued first time, ports kept on a restart); returns
        its WireGuard udp port."""
        files = self.gateway_files
        log = self.dir / "gateway.log"
        if not restart:
            files.app_id()
            files.issue_rpc_cert(self.dir / "kms-certs", self.host_ip)
            # the certbot's records of an earlier run name its pebble and bind9, which are gone
            for name in (CERTBOT_STORE, CERTBOT_LOCKS):
                (files.dir / "data" / name).unlink(missing_ok=True)
            acme: dict[str, Any] = {}
            if self.acme:
                bind, pebble = self.start_devdns()
                acme = {"acme_ca_bundle": pebble.ca_bundle, "dns_resolver": bind.server}
            else:
                files.issue_proxy_cert()
            self.gateway_admin_token = self.gateway_admin_token or os.urandom(16).hex()
            self.gateway_proxy_port = free_port()
            self.gateway_wg_port = devgateway.free_udp_port()
            write_private(
                files.config,
                devgateway.gateway_toml(
                    files,
                    rpc_address=self.host_ip,
                    rpc_port=free_port(),
                    admin_port=free_port(),
                    admin_token=self.gateway_admin_token,
                    proxy_port=self.gateway_proxy_port,
                    wg_port=self.gateway_wg_port,
                    wg_subnet=devgateway.wg_subnet_for(self.subnet),
                    interface=self.gateway_interface,
                    pccs_url=self.pccs_url,
                    root_ca=self.root_ca,
                    **acme,
                ),
            )
        offset = log.stat().st_size if log.exists() else 0
        proc = _spawn([sys.executable, "-m", "pydstack.gateway.main", "-c", str(files.config)], log)
        self._track("gateway", proc, log)
        self.gateway_url = _wait_line(proc, log, "dstack-gateway listening on", 60, offset).split()[
            -1
        ]
        self.gateway_admin = _wait_line(proc, log, "dstack-gateway admin on", 5, offset).split()[-1]
        if self.acme and not restart:
            self.add_zt_domain()
        return self.gateway_wg_port

    def start_devdns(self) -> tuple[DevBind, DevPebble]:
        """bind9 primary for the base domain and pebble validating through it (loopback), their
        processes tracked with the stack's; pebble's issuing root saved to `gateway_ca`."""
        d = self.dir / "acme"
        shutil.rmtree(d, ignore_errors=True)  # an earlier run's zone journal and pebble files
        try:
            bind = DevBind.start(d / "bind", (self.base_domain,))
            if bind.proc is not None:
                self._track("bind9", bind.proc, d / "bind" / "named.log")
            pebble = DevPebble.start(d / "pebble", bind.server)
            if pebble.proc is not None:
                self._track("pebble", pebble.proc, d / "pebble" / "pebble.log")
            root = pebble.root_pem()
        except (DstackError, httpx.HTTPError) as e:
            raise StackError(f"the local acme server did not start: {e}") from e
        self.gateway_files.dir.mkdir(parents=True, exist_ok=True)
        self.gateway_files.acme_root.write_text(root)
        self.devdns = (bind, pebble)
        return bind, pebble

    def add_zt_domain(self) -> None:
        """the base domain as the gateway's ZT-domain through its admin API: an RFC 2136
        credential for the stack's bind9 (the default), pebble as the ACME directory. The
        gateway's certbot starts ordering at once."""
        assert self.devdns is not None
        bind, pebble = self.devdns
        provider = bind.provider()
        self.gateway_rpc(
            "CreateDnsCredential",
            {
                "name": "dev bind9",
                "provider_type": "rfc2136",
                "set_as_default": True,
                "max_dns_wait": 30,
                "rfc2136_server": provider.server,
                "rfc2136_tsig_key_name": provider.tsig_key_name,
                "rfc2136_tsig_secret": provider.tsig_secret,
            },
        )
        self.gateway_rpc("SetCertbotConfig", {"acme_url": pebble.directory_url})
        self.gateway_rpc(
            "AddZtDomain", {"domain": self.base_domain, "port": self.gateway_proxy_port}
        )

    def wait_gateway_cert(self, timeout: float = 120) -> dict[str, Any]:
        """wait until the gateway serves a certificate for the base domain (with `acme`: the
        one its certbot got from pebble); its ``cert_status``. StackError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            status: dict[str, Any] = (
                self.gateway_rpc("GetZtDomain", {"domain": self.base_domain}).get("cert_status")
                or {}
            )
            if status.get("loaded_in_memory"):
                return status
            if time.monotonic() > deadline:
                raise StackError(
                    f"the gateway got no certificate for {self.base_domain} in {timeout:.0f} s"
                    f" (see {self.dir / 'gateway.log'})"
                )
            time.sleep(0.3)

    def stop_gateway(self) -> None:
        self._forget("gateway")

    def gateway_rpc(self, method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """call a gateway Admin method (JSON); StackError on any failure."""
        try:
            r = httpx.post(
                f"{self.gateway_admin}/prpc/{method}?json",
                json=body or {},
                headers={"Authorization": f"Bearer {self.gateway_admin_token}"},
                timeout=30,
            )
        except httpx.HTTPError as e:
            raise StackError(f"gateway {method}: {e}") from e
        if r.status_code != 200:
            raise StackError(f"gateway {method}: http {r.status_code}: {r.text[:300]}")
        out = r.json()
        return out if isinstance(out, dict) else {}

    def start_vmm(self) -> None:
        log = self.dir / "vmm.log"
        offset = log.stat().st_size if log.exists() else 0
        proc = _spawn([sys.executable, "-m", "pydstack.vmm.main", "-c", str(self.vmm_config)], log)
        self._track("vmm", proc, log)
        _wait_line(proc, log, "dstack-vmm listening on", 60, offset)

    def push_image(self, local: str) -> str:
        """publish a locally built image to the stack's registry (once); returns the name a
        compose refers to it by (CVMs pull it through their docker.io mirror)."""
        try:
            return push_image(local, self.registry_push)
        except ImageError as e:
            raise StackError(str(e)) from e

    def allow(self, apps: dict[str, list[str]]) -> None:
        write_allowlist(self.allowlist, apps, self.os_images, self.gateway_app_id)

    def client(self) -> SyncPrpcClient:
        """a typed prpc client of this stack's VMM (with its token)."""
        return SyncPrpcClient(self.vmm_url, token=self.auth_token)

    def rpc(self, method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """call a Vmm method with a JSON-shaped request (read into the method's message type,
        as the VMM reads it); the answer in the VMM's JSON form. StackError on any failure."""
        with self.client() as c:
            try:
                out = c.call_obj(VMM_SERVICE, method, body)
            except (PrpcCallError, PrpcUnreachable) as e:
                raise StackError(f"{method}: {e}") from e
        return out if isinstance(out, dict) else {}

    def info(self, vm_id: str) -> dict[str, Any]:
        info: dict[str, Any] = self.rpc("GetInfo", {"id": vm_id}).get("info") or {}
        return info

    def wait_vm(
        self,
        vm_id: str,
        until: str = "done",
        timeout: float = 120,
        on_progress: Callable[[str], None] | None = None,
        interval: float = 0.2,
    ) -> dict[str, Any]:
        """wait for boot progress `until` (or a boot error, raised), asking every `interval`
        seconds; returns the vm info. `on_progress` sees each new boot progress text."""
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        seen = ""
        while time.monotonic() < deadline:
            info = self.info(vm_id)
            progress = str(info.get("boot_progress") or "")
            if on_progress is not None and progress and progress != seen:
                on_progress(progress)
                seen = progress
            if info.get("boot_error"):
                raise StackError(f"vm {vm_id} failed to boot: {info['boot_error']}")
            if info.get("boot_progress") == until and info.get("status") == "running":
                return info
            time.sleep(interval)
        raise StackError(f"vm {vm_id} did not reach {until!r} in {timeout:.0f} s: {info}")

    @staticmethod
    def wait_http(url: str, timeout: float = 60) -> httpx.Response:
        """GET `url` until the app behind it answers (boot "done" means its containers started,
        not that they listen yet)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return httpx.get(url, timeout=10)
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def guest(self, method: str, vm_id: str) -> dict[str, Any]:
        """call the vm's guest API through the VMM's /guest proxy; StackError on failure."""
        headers = {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}
        try:
            r = httpx.post(
                f"{self.vmm_url}/guest/{method}?json", json={"id": vm_id}, headers=headers,
                timeout=30,
            )  # fmt: skip
        except httpx.HTTPError as e:
            raise StackError(f"guest {method}: {e}") from e
        if r.status_code != 200:
            raise StackError(f"guest {method}: {r.text[:200]}")
        out = r.json()
        return out if isinstance(out, dict) else {}

    def logs(self, vm_id: str, lines: int = 100) -> str:
        """the last `lines` of the vm's serial log (the VMM's refusal text if it refuses)."""
        params = {"id": vm_id, "follow": "false", "ansi": "false", "lines": str(lines)}
        with self.client() as c:
            try:
                return b"".join(c.stream("/logs", params)).decode(errors="replace")
            except (PrpcCallError, PrpcUnreachable) as e:
                return str(e)

    def remove_all(self) -> None:
        for vm in self.rpc("Status", {"brief": True}).get("vms", []):
            self.rpc("RemoveVm", {"id": vm["id"]})
        deadline = time.monotonic() + 60
        while self.rpc("Status", {"brief": True}).get("vms") and time.monotonic() < deadline:
            time.sleep(0.2)

    def _kill_leftover_cvms(self) -> None:
        """cvms outlive their vmm by design; a dev stack that ends takes its own down too."""
        pids = []
        vm_dirs = [p.parent for p in (self.dir / "run" / "vm").glob("*/launch.json")]
        for pid_file in (self.dir / "run" / "vm").glob("*/launcher.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text())
                if is_launcher(pid, pid_file.parent / "launch.json"):
                    os.kill(pid, signal.SIGTERM)  # the launcher stops its guest, frees the netns
                    pids.append(pid)
        deadline = time.monotonic() + 20 + 0.2 * len(pids)
        for pid in pids:
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        for vm_dir in vm_dirs:  # a launcher killed before its cleanup leaves its netns behind
            teardown_network(*names_for(vm_dir.name))
        for state in (self.dir / "run" / "vm").glob(f"*/{QEMU_STATE}"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                pid = int(json.loads(state.read_text())["pid"])
                if is_qemu_of(pid, state.parent):
                    os.killpg(pid, signal.SIGKILL)

    def stop(self, remove_vms: bool = True, remove_bridge: bool = False) -> None:
        vmm = self.procs.get("vmm")
        if remove_vms and vmm is not None and vmm.proc is not None:
            with contextlib.suppress(StackError):
                self.remove_all()
        if remove_vms:
            self._kill_leftover_cvms()
        for name in ("vmm", "gateway", "kms", "pccs", "registry", "registry-ro", "pebble", "bind9"):
            self._forget(name)
        if self.gateway:
            devgateway.remove_interface(self.gateway_interface)
        if remove_bridge:
            teardown_bridge(self.bridge, self.subnet)
