"""the sandbox launcher: one sandbox CVM as Linux namespaces on this host.

One CVM = one launcher process (`python -m pydstack.vmm.backends.sandbox.launcher --spec
WD/launch.json`), the counterpart of a QEMU process: started by the VMM in its own session so it
outlives a VMM restart, it

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
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import cgroups
from .forward import PortForward, forward_tcp, forward_udp
from .network import SandboxError, setup_network, teardown_network

log = logging.getLogger("dstack-sandbox")
PR_SET_PDEATHSIG = 1
#: the module the launcher runs as (`python -m`), how its processes are recognised again
MODULE = "pydstack.vmm.backends.sandbox.launcher"
#: launchers started before the sandbox moved under `backends` (still running after an upgrade)
LEGACY_MODULE = "pydstack.vmm.sandbox"


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


def is_launcher(pid: int, spec: Path) -> bool:
    """whether `pid` is (still) the launcher of the CVM described by `spec` (pids get reused)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    modules = (MODULE.encode(), LEGACY_MODULE.encode())
    return str(spec).encode() in cmd and any(m in cmd for m in modules)


def _pdeathsig() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _cvm_cgroup(spec: LaunchSpec) -> cgroups.CvmCgroup | None:
    if not (spec.vcpu and spec.memory_mb):
        return None
    try:
        cg = cgroups.create(spec.vm_id, spec.vcpu, spec.memory_mb)
    except cgroups.CgroupError as e:
        log.warning("%s; the cvm runs without vcpu and memory limits", e)
        return None
    log.info("cvm limited to %d vcpu and %d MiB (cgroup %s)", spec.vcpu, spec.memory_mb, cg.path)
    cg.save(Path(spec.workdir) / cgroups.CGROUP_FILE)
    return cg


async def launch(spec: LaunchSpec) -> int:
    wd = Path(spec.workdir)
    for d in ("host-api", "guest-api"):
        (wd / d).mkdir(exist_ok=True)
    setup_network(spec.vm_id, spec.netns, spec.veth, spec.bridge, spec.address, spec.gateway)
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
            await cgroups.remove_cgroup(wd)


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
