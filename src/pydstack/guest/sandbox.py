"""the CVM "operating system" of the sandbox backend: PID 1 of a sandboxed CVM.

Started by the VMM's launcher inside fresh network, mount and PID namespaces
(`python -m pydstack.guest.sandbox --workdir WD`), it plays the part of the guest image:

1. makes the CVM's private filesystem view: tmpfs on /run and /tmp, the host share bind-mounted
   read-only at /run/dstack/host-shared, the host-API and guest-API socket directories;
2. uses the TD its VMM keeps for it (:mod:`pydstack.tee.hosttd`: extend RTMR3, quotes over
   report data; the measurements and the signing key stay in the VMM) and runs the common boot
   flow (:mod:`pydstack.guest.boot`): RTMR3 measurement, keys from the KMS over RA-TLS, env
   decryption filtered by allowed_envs;
3. opens the persistent storage: a gocryptfs volume keyed by the KMS disk key (FUSE, since the
   host has no dm-crypt), created on first boot and reopened afterwards;
4. serves the guest agent on /var/run/dstack.sock and /var/run/tappd.sock and the guest API
   for the VMM, registers with dstack-gateway when the app asks for it
   (:mod:`pydstack.guest.gateway_client`: WireGuard inside the CVM's network namespace), then
   runs the docker-compose app with podman;
5. reports every step to the VMM over the host API; on failure reports boot.error and exits.

SIGTERM or the guest API's Shutdown stop the containers and end the CVM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

from pydstack import __version__
from pydstack.errors import InputError
from pydstack.rpc.calls import PrpcService
from pydstack.rpc.errors import RpcError
from pydstack.rpc.http1 import Http1Server
from pydstack.tee.hosttd import HostTdx
from pydstack.types import hostshare as hs
from pydstack.types.app_compose import AppCompose, AppComposeError
from pydstack.types.docker_compose import STRICT, ComposeError, ComposeProject
from pydstack.types.sysconfig import SysConfig

from . import gateway_client
from .boot import Booter, BootError, BootResult
from .compose_runner import ImagePrefetch, PodmanCompose, named_images, podman_env
from .guest_api import GUEST_API_SERVICE, GuestApi
from .hostapi import HostApi
from .runtime import start_runtime
from .servers import RESPONSE_HEADERS
from .storage import Storage, sh

if TYPE_CHECKING:
    from pydstack.rpc.server import PrpcServer

log = logging.getLogger("dstack-guest")

RUN = Path("/run")
DSTACK = RUN / "dstack"
HOST_SHARED = DSTACK / "host-shared"
HOST_API = DSTACK / "host-api"
GUEST_API = DSTACK / "guest-api"
WORK = DSTACK / "work"
PERSISTENT = DSTACK / "persistent"
VM = DSTACK / "vm"
#: ids in the app containers' user namespace (the vmm gives each cvm its own range)
USERNS_SIZE = 65536


def own_cvm_cgroup() -> str | None:
    """the cgroup the host put this CVM in (for `--cgroup-parent`, so the app's containers
    count against the CVM's vcpu and memory), or None when it runs unconstrained."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    for line in lines:
        hid, ctrls, path = line.split(":", 2)
        mine = (hid == "0" and not ctrls) if v2 else "memory" in ctrls.split(",")
        if mine and "/dstack/" in path:
            return path
    return None


def _code_dirs() -> list[str]:
    """directories holding this interpreter and its modules that the CVM's fresh /run and
    /tmp would hide (outermost first, nested ones dropped)."""
    import pydstack

    candidates = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    candidates.add(str(Path(pydstack.__file__).resolve().parents[1]))
    candidates.update(p for p in sys.path if p)
    hidden = sorted(
        {
            os.path.realpath(c)
            for c in candidates
            if os.path.isdir(c) and os.path.realpath(c).startswith(("/tmp/", "/run/"))
        }
    )
    out: list[str] = []
    for d in hidden:
        if not any(d == o or d.startswith(o + "/") for o in out):
            out.append(d)
    return out


def setup_mounts(wd: Path) -> Path:
    """the CVM's own /run and /tmp, with the host share read-only (private mount namespace).

    Returns where the VM directory is visible afterwards (it may live under /run or /tmp, so it
    is held open across the tmpfs mounts and bind-mounted back at /run/dstack/vm).
    """
    fd = os.open(wd, os.O_PATH | os.O_DIRECTORY)
    # the interpreter and pydstack itself may live under /run or /tmp too (a checkout in /tmp):
    # keep them visible at their paths, or later imports fail inside the CVM
    kept = _code_dirs()
    kept_fds = {k: os.open(k, os.O_PATH | os.O_DIRECTORY) for k in kept}
    try:
        sh("mount", "--make-rprivate", "/")
        sh("mount", "-t", "tmpfs", "-o", "mode=755,nosuid,nodev", "tmpfs", str(RUN))
        VM.mkdir(parents=True)
        sh("mount", "--no-canonicalize", "--bind", f"/proc/{os.getpid()}/fd/{fd}", str(VM))
        sh("mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", "/tmp")
        for code_dir, dfd in kept_fds.items():
            Path(code_dir).mkdir(parents=True, exist_ok=True)
            sh("mount", "--no-canonicalize", "--bind", f"/proc/{os.getpid()}/fd/{dfd}", code_dir)
    finally:
        os.close(fd)
        for dfd in kept_fds.values():
            os.close(dfd)
    for d in (HOST_SHARED, HOST_API, GUEST_API, WORK, PERSISTENT):
        d.mkdir(parents=True, exist_ok=True)
    sh("mount", "--bind", str(VM / "shared"), str(HOST_SHARED))
    sh("mount", "-o", "remount,bind,ro", str(HOST_SHARED))
    sh("mount", "--bind", str(VM / "host-api"), str(HOST_API))
    sh("mount", "--bind", str(VM / "guest-api"), str(GUEST_API))
    sh("ip", "link", "set", "lo", "up")
    _own_hosts_file()
    return VM


def _own_hosts_file() -> None:
    """/etc/hosts and /etc/hostname naming this CVM (its own uts namespace has its own name):
    a name that does not resolve locally costs programs a DNS timeout at start."""
    name = socket.gethostname()
    etc = RUN / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "hosts").write_text(
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    (etc / "hostname").write_text(name + "\n")
    for f in ("hosts", "hostname"):
        if Path("/etc", f).exists():
            sh("mount", "--bind", str(etc / f), f"/etc/{f}")


def storage_conf(wd: Path) -> Path:
    """podman storage private to this CVM; images come from the registry
    (:func:`registries_conf`), the host's image store is not visible. Pulled images stay for
    the CVM's next boot (as a CVM's docker data stays on its disk), so only its first boot pays
    the pull; containers of an earlier boot are removed before the app starts."""
    graph = wd / "containers"
    if graph.exists():  # nothing of a dead boot may stay mounted over it
        subprocess.run(["umount", "-R", "-l", str(graph)], capture_output=True, check=False)
    graph.mkdir(mode=0o700, exist_ok=True)
    conf = DSTACK / "storage.conf"
    conf.write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{graph}"\nrunroot = "{RUN / "containers"}"\n'
    )
    return conf


#: a registry as podman names it: host or [ipv6], optional port (nothing that could leave a
#: toml string)
_REGISTRY_HOST = re.compile(r"(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")


def registries_conf(docker_registry: str) -> Path:
    """podman's registries.conf of this CVM: `docker_registry` (sys-config, a URL as upstream's
    `registry-mirrors` takes) is a mirror of docker.io, where short names (`name:tag`) resolve,
    and may also be named directly (`<host:port>/name:tag`); plain http is allowed for it (the
    VMM's host-side registry). Without one, only fully named images of reachable registries
    pull. BootError for a registry that is not a `[scheme://]host[:port]`."""
    conf = DSTACK / "registries.conf"
    lines = ['unqualified-search-registries = ["docker.io"]', 'short-name-mode = "permissive"']
    if docker_registry:
        try:
            parsed = urllib.parse.urlsplit(
                docker_registry if "://" in docker_registry else f"//{docker_registry}"
            )
        except ValueError:
            parsed = urllib.parse.urlsplit("//")
        host = parsed.netloc
        if parsed.path.strip("/") or not _REGISTRY_HOST.fullmatch(host):
            raise BootError(f"invalid docker_registry {docker_registry[:100]!r} in sys-config")
        lines += [
            "",
            "[[registry]]",
            'prefix = "docker.io"',
            'location = "docker.io"',
            "[[registry.mirror]]",
            f'location = "{host}"',
            "insecure = true",
            "",
            "[[registry]]",
            f'location = "{host}"',
            "insecure = true",
        ]
    # replaced whole: podman pulls started ahead may be reading it while the boot writes it again
    tmp = conf.with_name(conf.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, conf)
    return conf


def app_owned_dir(path: Path, uid_base: int) -> Path:
    """a directory the app's containers may write: owned by container root (host `uid_base`)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if uid_base:
        os.chown(path, uid_base, uid_base)
    return path


async def boot_and_run(wd: Path, scrypt_n: int, uid_base: int = 0) -> int:
    try:
        wd = setup_mounts(wd)
    except (BootError, OSError) as e:
        log.error("cannot set up the cvm's filesystem: %s", e)
        return 1
    host = HostApi(HOST_API / "api.sock")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers: list[PrpcServer | Http1Server] = []
    compose: PodmanCompose | None = None
    api: GuestApi | None = None
    gateway: gateway_client.GatewayClient | None = None
    prefetch: ImagePrefetch | None = None
    reported = False
    try:
        try:
            compose_raw = (HOST_SHARED / hs.APP_COMPOSE).read_bytes()
        except OSError as e:
            raise BootError(f"cannot read app-compose.json: {e.strerror}") from e
        # a new storage's images are pulled while the keys are asked for and the disk set up
        new_storage = not (wd / "containers").exists()
        podman_storage = storage_conf(wd)
        if new_storage:
            prefetch = _prefetch(compose_raw, podman_storage)
        tdx = HostTdx(HOST_API / "api.sock")  # the td lives in the vmm, out of our reach
        booter = Booter(tdx, HOST_SHARED, WORK, host.notify)
        try:
            result: BootResult = await booter.run(
                storage_fs="gocryptfs",
                storage=Storage(
                    wd,
                    host,
                    scrypt_n,
                    _key_provider(compose_raw) == "none",
                    shared=bool(uid_base),
                    mount_point=PERSISTENT,
                ),
            )
        except BootError:
            reported = True  # the boot flow reported it already
            raise
        runtime = await start_runtime(
            tdx, result, WORK, RUN, host.notify, socket_group=uid_base or None
        )
        core, compose_raw, sys_config = runtime.core, runtime.compose_raw, runtime.sys_config
        servers.extend(runtime.servers)
        gateway = runtime.gateway
        app = AppCompose.parse(compose_raw)
        await host.notify("boot.progress", "setting up docker")
        envs = dict(result.envs)
        project = ComposeProject.parse(
            app.docker_compose_file, _project_name(app.name), envs, policy=STRICT
        )
        compose = PodmanCompose(
            project,
            storage_conf=podman_storage,
            new_storage=new_storage,
            prefetch=prefetch,
            registries_conf=registries_conf(sys_config.docker_registry),
            volumes_dir=app_owned_dir(PERSISTENT / "volumes", uid_base),
            binds_dir=app_owned_dir(PERSISTENT / "binds", uid_base),
            cgroup_parent=own_cvm_cgroup(),
            userns=(uid_base, USERNS_SIZE) if uid_base else None,
        )
        api = GuestApi(core, compose, stop, data_mount=PERSISTENT, os_name="pydstack-sandbox")
        gserver = Http1Server(response_headers=RESPONSE_HEADERS)
        gserver.mount(PrpcService(GUEST_API_SERVICE, api, prefix="/api"))
        await gserver.listen_unix(GUEST_API / "api.sock", mode=0o600)
        servers.append(gserver)
        await host.notify("boot.progress", "starting containers")
        os.chdir(WORK)
        try:
            await compose.up()
        except ComposeError as e:
            raise BootError(f"failed to start containers: {e}") from e
        if gateway is not None:  # "done" still means registered (or retrying on its own)
            await gateway.ready()
        await host.notify("boot.progress", "done")
        await stop.wait()
        if api.shutdown_requested:
            await host.notify("shutdown.progress", "stopping containers")
        await compose.down()
        if api.shutdown_requested:
            await host.notify("shutdown.progress", "powering off")
        return 0
    except (BootError, ComposeError, RpcError) as e:
        if not reported:
            await host.notify("boot.error", str(e))
        log.error("boot failed: %s", e)
        if compose is not None:
            await compose.down(timeout=2)
        return 1
    except Exception as e:  # a bug: still tell the host instead of dying silently
        log.exception("boot failed unexpectedly")
        if not reported:
            await host.notify("boot.error", f"internal error: {type(e).__name__}: {e}")
        if compose is not None:
            await compose.down(timeout=2)
        return 1
    finally:
        if prefetch is not None:
            await prefetch.cancel()
        if gateway is not None:
            await gateway.close()
        for s in servers:
            await s.close()
        await host.client.close()
        subprocess.run(["fusermount3", "-u", "-z", str(PERSISTENT)], capture_output=True)


def _prefetch(compose_raw: bytes, podman_storage: Path) -> ImagePrefetch | None:
    """pulls of the images the app's compose names outright, started now; None when there is
    nothing to pull or the compose or sys-config does not read (the boot reports that)."""
    try:
        app = AppCompose.parse(compose_raw)
        app.check_policy()
        images = named_images(app.docker_compose_file)
        registry = SysConfig.load(HOST_SHARED / hs.SYS_CONFIG).docker_registry
    except (InputError, OSError) as e:
        log.info("not pulling images ahead: %s", e)
        return None
    if not images:
        return None
    return ImagePrefetch(images, podman_env(podman_storage, registries_conf(registry)))


def _key_provider(raw: bytes) -> str:
    """the app's key provider, or "" when the compose is unreadable (the boot flow then
    reports why)."""
    try:
        return AppCompose.parse(raw).key_provider
    except AppComposeError:
        return ""


def _project_name(app_name: str) -> str:
    raw = (app_name or "app").lower()
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in raw).strip("-_")
    return name[:40] or "app"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="pydstack-sandbox-guest")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--scrypt-n", type=int, default=10)
    parser.add_argument("--hostname", default="", help="set in the cvm's own uts namespace")
    parser.add_argument(
        "--uid-base", type=int, default=0, help="host uid of the app containers' root"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if os.getpid() == 1 and not args.child:
        from . import sandbox_init

        return sandbox_init.main(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    log.info("pydstack sandbox guest %s on %s booting", __version__, socket.gethostname())
    return asyncio.run(boot_and_run(args.workdir.resolve(), args.scrypt_n, args.uid_base))


if __name__ == "__main__":
    sys.exit(main())
