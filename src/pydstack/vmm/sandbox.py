"""the sandbox backend: a CVM as Linux namespaces on this host, where no TEE is available.

One CVM = one launcher process (`python -m pydstack.vmm.sandbox --spec WD/launch.json`), the
counterpart of a QEMU process: started by the VMM in its own session so it outlives a VMM
restart, it

* gives the CVM a network namespace joined to the host bridge by a veth pair, with its own
  address (the host is the bridge's first address, as 10.0.2.2 is under QEMU);
* forwards the VM's port mappings from host ports into the CVM (TCP and UDP);
* starts the guest as PID 1 of new mount, PID and UTS namespaces inside that network namespace
  (:mod:`pydstack.guest.sandbox_init`, which runs :mod:`pydstack.guest.sandbox`), its output
  going to `serial.log`;
* on SIGTERM asks the guest to stop (10 s grace, then kill); when the guest ends, removes the
  network namespace and exits with the guest's status.

Killing the launcher kills the CVM: the guest's parent dies with it (PDEATHSIG) and the PID
namespace takes every container process along.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydstack.errors import DstackError

from . import cgroups

log = logging.getLogger("dstack-sandbox")
PR_SET_PDEATHSIG = 1


class SandboxError(DstackError):
    """the host cannot set up a sandbox CVM."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise SandboxError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def ensure_bridge(name: str, subnet: str) -> None:
    """the host bridge CVMs attach to, with the host's address on it (idempotent)."""
    net = ipaddress.ip_network(subnet)
    host = f"{net.network_address + 1}/{net.prefixlen}"
    if ip("link", "show", name, check=False).returncode != 0:
        ip("link", "add", name, "type", "bridge")
    addrs = ip("-j", "addr", "show", name).stdout
    if host.split("/")[0] not in addrs:
        ip("addr", "add", host, "dev", name)
    ip("link", "set", name, "up")


def _iptables(*args: str, table: str = "filter", check: bool = True) -> bool:
    proc = subprocess.run(
        ["iptables", "-w", "-t", table, *args], capture_output=True, text=True, check=False
    )
    if check and proc.returncode != 0:
        raise SandboxError(f"iptables {' '.join(args)}: {proc.stderr.strip()}")
    return proc.returncode == 0


def _chains(bridge: str) -> tuple[str, str]:
    return f"DS-IN-{bridge}", f"DS-FWD-{bridge}"


def apply_bridge_policy(
    bridge: str, subnet: str, host_ports: Iterable[int], *, outbound: bool = True
) -> None:
    """what CVMs on `bridge` may reach: on the host only `host_ports` (tcp and udp) at the
    bridge address, never each other (ports are isolated on the bridge and routed traffic
    between them is dropped), nothing may open a connection into them through the host, and
    the outside world (masqueraded) only when `outbound`. Rebuilt from scratch each call.

    Without iptables the host cannot enforce this, and a CVM could reach every host listener:
    that is refused rather than run open.
    """
    if shutil.which("iptables") is None:
        raise SandboxError("iptables is missing: cannot keep cvms away from host services")
    net = ipaddress.ip_network(subnet)
    host_ip = str(net.network_address + 1)
    chain_in, chain_fwd = _chains(bridge)
    for chain in (chain_in, chain_fwd):
        if not _iptables("-N", chain, check=False):
            _iptables("-F", chain)
    for parent, direction in (("INPUT", "-i"), ("FORWARD", "-i"), ("FORWARD", "-o")):
        target = chain_in if parent == "INPUT" else chain_fwd
        rule = [parent, direction, bridge, "-j", target]
        if not _iptables("-C", *rule, check=False):
            _iptables("-I", *rule)
    established = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]
    _iptables("-A", chain_in, *established)
    for port in sorted(set(host_ports)):
        for proto in ("tcp", "udp"):
            _iptables(
                "-A", chain_in, "-d", host_ip, "-p", proto, "--dport", str(port), "-j", "ACCEPT"
            )
    _iptables("-A", chain_in, "-p", "icmp", "--icmp-type", "echo-request", "-j", "ACCEPT")
    _iptables("-A", chain_in, "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset")
    _iptables("-A", chain_in, "-j", "REJECT")
    _iptables("-A", chain_fwd, "-i", bridge, "-o", bridge, "-j", "DROP")
    _iptables("-A", chain_fwd, "-o", bridge, *established)
    _iptables("-A", chain_fwd, "-o", bridge, "-j", "DROP")
    _iptables("-A", chain_fwd, "-i", bridge, "-j", "ACCEPT" if outbound else "DROP")
    nat = ["POSTROUTING", "-s", str(net), "!", "-o", bridge, "-j", "MASQUERADE"]
    present = _iptables("-C", *nat, table="nat", check=False)
    if outbound and not present:
        _iptables("-A", *nat, table="nat")
    elif not outbound and present:
        _iptables("-D", *nat, table="nat")
    if outbound:
        forward = Path("/proc/sys/net/ipv4/ip_forward")
        with contextlib.suppress(OSError):
            if forward.read_text().strip() != "1":
                log.info("enabling ipv4 forwarding for cvm traffic")
                forward.write_text("1\n")


def teardown_bridge(bridge: str, subnet: str) -> None:
    """remove the bridge, its filter chains and its NAT rule (what ensure_bridge and
    apply_bridge_policy made)."""
    if shutil.which("iptables") is not None:
        chain_in, chain_fwd = _chains(bridge)
        for parent, direction, target in (
            ("INPUT", "-i", chain_in),
            ("FORWARD", "-i", chain_fwd),
            ("FORWARD", "-o", chain_fwd),
        ):
            while _iptables("-D", parent, direction, bridge, "-j", target, check=False):
                pass
        for chain in (chain_in, chain_fwd):
            _iptables("-F", chain, check=False)
            _iptables("-X", chain, check=False)
        nat = ["POSTROUTING", "-s", subnet, "!", "-o", bridge, "-j", "MASQUERADE"]
        while _iptables("-D", *nat, table="nat", check=False):
            pass
    ip("link", "del", bridge, check=False)


def ports_of_urls(urls: Iterable[str]) -> set[int]:
    """the ports named by service urls (default 443 for https, 80 for http)."""
    out: set[int] = set()
    for url in urls:
        if not url:
            continue
        parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        try:
            port = parsed.port
        except ValueError:
            continue
        out.add(port or (443 if parsed.scheme == "https" else 80))
    return out


@dataclass
class PortForward:
    protocol: str
    address: str
    host_port: int
    vm_port: int


@dataclass
class LaunchSpec:
    vm_id: str
    workdir: str
    netns: str
    veth: str
    address: str  # CVM address with prefix, e.g. 10.213.0.2/16
    gateway: str
    bridge: str
    ports: list[PortForward] = field(default_factory=list)
    scrypt_n: int = 10
    python: str = sys.executable
    hostname: str = ""
    #: host uid/gid that container root maps to (65536 ids from here); 0: no user namespace
    uid_base: int = 0
    vcpu: int = 0  # 0: no limit
    memory_mb: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def load(cls, path: Path) -> LaunchSpec:
        obj = json.loads(path.read_text())
        obj["ports"] = [PortForward(**p) for p in obj.get("ports", [])]
        return cls(**obj)

    @property
    def guest_ip(self) -> str:
        return self.address.split("/")[0]


def mac_for(vm_id: str) -> str:
    """the CVM's eth0 address: locally administered, stable across restarts."""
    digest = hashlib.sha256(vm_id.encode()).digest()
    return ":".join(f"{b:02x}" for b in (b"\x02" + digest[:5]))


def is_launcher(pid: int, spec: Path) -> bool:
    """whether `pid` is (still) the launcher of the CVM described by `spec` (pids get reused)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return str(spec).encode() in cmd and b"pydstack.vmm.sandbox" in cmd


def names_for(vm_id: str) -> tuple[str, str]:
    short = vm_id.replace("-", "")[:10]
    return f"dstack-{short}", f"ds{short}"


def teardown_network(netns: str, veth: str) -> None:
    ip("link", "del", veth, check=False)
    ip("netns", "del", netns, check=False)


def setup_network(spec: LaunchSpec) -> None:
    teardown_network(spec.netns, spec.veth)
    peer = "p" + spec.veth[1:]
    ip("netns", "add", spec.netns)
    try:
        ip("link", "add", spec.veth, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", spec.netns)
        ip("link", "set", spec.veth, "master", spec.bridge)
        # an isolated bridge port talks to the host, never to another cvm's port
        ip("link", "set", "dev", spec.veth, "type", "bridge_slave", "isolated", "on")
        ip("link", "set", spec.veth, "up")
        ip("-n", spec.netns, "link", "set", peer, "name", "eth0")
        ip("-n", spec.netns, "link", "set", "eth0", "address", mac_for(spec.vm_id))
        ip("-n", spec.netns, "addr", "add", spec.address, "dev", "eth0")
        ip("-n", spec.netns, "link", "set", "eth0", "up")
        ip("-n", spec.netns, "link", "set", "lo", "up")
        ip("-n", spec.netns, "route", "add", "default", "via", spec.gateway)
    except SandboxError:
        teardown_network(spec.netns, spec.veth)
        raise


# ---------------------------------------------------------------------- port forwarding
async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def forward_tcp(pf: PortForward, target: str) -> asyncio.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.wait_for(asyncio.open_connection(target, pf.vm_port), 10)
        except (OSError, TimeoutError):
            w.close()
            return
        await asyncio.gather(_pipe(r, uw), _pipe(ur, w))

    return await asyncio.start_server(handle, pf.address, pf.host_port, reuse_address=True)


class _UdpRelay(asyncio.DatagramProtocol):
    """host port → CVM port; one upstream socket per client address."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.transport: asyncio.DatagramTransport | None = None
        self.peers: dict[tuple[str, int], asyncio.DatagramTransport] = {}
        self.pending: set[asyncio.Future[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        up = self.peers.get(addr)
        if up is not None:
            up.sendto(data)
            return
        if len(self.peers) >= 1024:
            return
        task = asyncio.ensure_future(self._open(data, addr))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _open(self, data: bytes, addr: tuple[str, int]) -> None:
        relay = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, d: bytes, _: tuple[str, int]) -> None:
                if relay.transport is not None:
                    relay.transport.sendto(d, addr)

        loop = asyncio.get_running_loop()
        up, _ = await loop.create_datagram_endpoint(Back, remote_addr=self.target)
        self.peers[addr] = up
        up.sendto(data)


async def forward_udp(pf: PortForward, target: str) -> asyncio.DatagramTransport:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _UdpRelay((target, pf.vm_port)), local_addr=(pf.address, pf.host_port)
    )
    return transport


def _pdeathsig() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


CGROUP_FILE = "cgroup.json"


async def remove_cgroup(workdir: Path) -> None:
    """remove a stopped CVM's cgroup (its processes may take a moment to be reaped)."""
    cg = cgroups.CvmCgroup.load(workdir / CGROUP_FILE)
    if cg is None:
        return
    for _ in range(30):
        cg.remove()
        if not any(d.exists() for d in cg.dirs):
            return
        await asyncio.sleep(0.1)
    log.warning("cgroup %s is still busy; left in place", cg.path)


def _cvm_cgroup(spec: LaunchSpec) -> cgroups.CvmCgroup | None:
    if not (spec.vcpu and spec.memory_mb):
        return None
    try:
        cg = cgroups.create(spec.vm_id, spec.vcpu, spec.memory_mb)
    except cgroups.CgroupError as e:
        log.warning("%s; the cvm runs without vcpu and memory limits", e)
        return None
    log.info("cvm limited to %d vcpu and %d MiB (cgroup %s)", spec.vcpu, spec.memory_mb, cg.path)
    cg.save(Path(spec.workdir) / CGROUP_FILE)
    return cg


async def launch(spec: LaunchSpec) -> int:
    wd = Path(spec.workdir)
    for d in ("host-api", "guest-api"):
        (wd / d).mkdir(exist_ok=True)
    setup_network(spec)
    servers: list[asyncio.Server] = []
    transports: list[asyncio.DatagramTransport] = []
    guest: asyncio.subprocess.Process | None = None
    cg: cgroups.CvmCgroup | None = None
    try:
        for pf in spec.ports:
            if pf.protocol == "udp":
                transports.append(await forward_udp(pf, spec.guest_ip))
            else:
                servers.append(await forward_tcp(pf, spec.guest_ip))
            log.info(
                "forwarding %s %s:%d -> %s:%d",
                pf.protocol,
                pf.address,
                pf.host_port,
                spec.guest_ip,
                pf.vm_port,
            )
        cg = _cvm_cgroup(spec)

        def child_setup() -> None:
            _pdeathsig()
            if cg is not None:
                cg.join()  # before exec: the guest and everything it starts is inside

        serial = open(wd / "serial.log", "ab")  # noqa: SIM115 - owned by the guest process
        guest = await asyncio.create_subprocess_exec(
            "nsenter",
            f"--net=/run/netns/{spec.netns}",
            "--",
            "unshare",
            "--mount",
            "--pid",
            "--uts",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--",
            spec.python,
            "-m",
            "pydstack.guest.sandbox_init",
            "--workdir",
            str(wd),
            "--scrypt-n",
            str(spec.scrypt_n),
            "--hostname",
            spec.hostname or f"dstack-{spec.vm_id[:8]}",
            "--uid-base",
            str(spec.uid_base),
            stdin=subprocess.DEVNULL,
            stdout=serial,
            stderr=subprocess.STDOUT,
            preexec_fn=child_setup,
        )
        serial.close()
        (wd / "guest.pid").write_text(str(guest.pid))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.ensure_future(guest.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            log.info("stopping the guest")
            with contextlib.suppress(ProcessLookupError):
                _signal_guest_init(guest.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), 15)
            except TimeoutError:
                log.warning("guest did not stop in 15 s; killing it")
                guest.kill()
                await waiter
        stopper.cancel()
        code = guest.returncode or 0
        log.info("guest exited with status %d", code)
        return code
    finally:
        for s in servers:
            s.close()
        for t in transports:
            t.close()
        if guest is not None and guest.returncode is None:
            guest.kill()
        teardown_network(spec.netns, spec.veth)
        if cg is not None:
            await remove_cgroup(wd)


def _signal_guest_init(unshare_pid: int, sig: int) -> None:
    """signal PID 1 of the CVM (the child of `unshare`)."""
    children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children")
    try:
        pids = [int(p) for p in children.read_text().split()]
    except (OSError, ValueError):
        pids = []
    for pid in pids or [unshare_pid]:
        os.kill(pid, sig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pydstack-sandbox-launcher")
    parser.add_argument("--spec", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    spec = LaunchSpec.load(args.spec)
    try:
        return asyncio.run(launch(spec))
    except SandboxError as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
