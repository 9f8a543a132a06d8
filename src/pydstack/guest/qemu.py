"""the guest of a QEMU CVM: the common boot flow and the agent on a VM's own kernel.

Started by :mod:`pydstack.guest.qemu_init` (PID 1) once the host share is mounted read-only at
/run/dstack/host-shared. It

1. finds its TD: real TDX (`/dev/tdx_guest`, configfs-tsm) when the VM has one; else, on a dev
   image and only when the host share's sys-config says `simulated_tee`, the TD its VMM keeps
   (:class:`~pydstack.tee.hosttd.HostTdx` over the VM's host-API channel, `host_api_url`); a
   prod image has no simulator and refuses to boot without TDX;
2. runs the common boot flow (:mod:`pydstack.guest.boot`): RTMR3 events in upstream's order,
   keys from the KMS over RA-TLS, env decryption filtered by allowed_envs, and the data disk
   (`/dev/vdb`) as LUKS2 keyed with the KMS disk key (:mod:`.luks`), ext4 inside;
3. serves the agent on /var/run/dstack.sock and tappd.sock, the guest API for the VMM on
   GUEST_API_PORT (reached through the VM's own host forward), then runs the compose app with
   podman (containers in a user namespace, images from the registry in sys-config);
4. reports every step to the VMM over the host API; on failure reports boot.error and exits
   (PID 1 then powers the VM off).

SIGTERM, the ACPI power button (QMP `system_powerdown`) or the guest API's Shutdown stop the
containers, close the data disk and end the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from pydstack import __version__
from pydstack.rpc.calls import PrpcService
from pydstack.rpc.errors import RpcError
from pydstack.rpc.http1 import Http1Server
from pydstack.types import hostshare as hs
from pydstack.types.app_compose import AppCompose
from pydstack.types.docker_compose import STRICT, ComposeError, ComposeProject
from pydstack.types.sysconfig import SysConfig, SysConfigError

from . import gateway_client
from .boot import Booter, BootError, BootResult
from .compose_runner import PodmanCompose
from .guest_api import GUEST_API_SERVICE, GuestApi
from .hostapi import HostApi
from .luks import LuksStorage
from .qemu_init import uptime
from .runtime import start_runtime
from .sandbox import _key_provider, _project_name, app_owned_dir, registries_conf
from .servers import RESPONSE_HEADERS

if TYPE_CHECKING:
    from pydstack.rpc.server import PrpcServer

log = logging.getLogger("dstack-guest")

RUN = Path("/run")
DSTACK = RUN / "dstack"
HOST_SHARED = DSTACK / "host-shared"
WORK = DSTACK / "work"
PERSISTENT = DSTACK / "persistent"
DATA_DISK = Path("/dev/vdb")
#: the guest API's port in the VM (the VMM reaches it through its host forward only)
GUEST_API_PORT = 60001
IMAGE_INFO = Path("/etc/dstack/image.json")
#: app containers' root is this unprivileged uid of the VM (a user namespace of USERNS_SIZE ids)
UID_BASE = 65536
USERNS_SIZE = 65536
KEY_POWER, EV_KEY = 116, 1


def image_flavour() -> str:
    try:
        return str(json.loads(IMAGE_INFO.read_text()).get("flavour", "prod"))
    except (OSError, ValueError, AttributeError):
        return "prod"


def host_api_base(url: str) -> str:
    """the host-API server's base from sys-config's `host_api_url` (`.../api` as upstream)."""
    return url.removesuffix("/").removesuffix("/api")


def find_tdx(sys_config: SysConfig) -> object:
    """the TD of this VM; BootError when it has none it may use."""
    from pydstack.tee import real

    if real.tdx_available():
        return real.RealTdx()
    if not sys_config.simulated_tee:
        raise BootError("this vm has no tdx device and the host asked for no simulated tee")
    if image_flavour() != "dev":
        raise BootError("this vm has no tdx device, and a prod image has no tee simulator")
    try:
        from pydstack.tee.hosttd import HostTdx
    except ImportError:
        raise BootError("this image has no tee simulator") from None
    if not sys_config.host_api_url.startswith("http://"):
        raise BootError("the simulated tee needs an http host_api_url in sys-config")
    return HostTdx(host_api_base(sys_config.host_api_url))


def _power_button(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """set `stop` when the ACPI power button is pressed (QMP system_powerdown)."""
    try:
        text = Path("/proc/bus/input/devices").read_text()
    except OSError:
        return
    for block in text.split("\n\n"):
        if "Power Button" not in block:
            continue
        for line in block.splitlines():
            if line.startswith("H: Handlers=") and "event" in line:
                ev = next(h for h in line.split("=", 1)[1].split() if h.startswith("event"))
                threading.Thread(
                    target=_watch_button, args=(Path("/dev/input", ev), loop, stop), daemon=True
                ).start()


def _watch_button(dev: Path, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    fmt = "llHHi"
    size = struct.calcsize(fmt)
    try:
        with open(dev, "rb") as f:
            while True:
                data = f.read(size)
                if len(data) < size:
                    return
                _, _, etype, code, value = struct.unpack(fmt, data)
                if etype == EV_KEY and code == KEY_POWER and value == 1:
                    log.info("power button pressed: shutting down")
                    loop.call_soon_threadsafe(stop.set)
                    return
    except OSError:
        return


def _firewall() -> None:
    """only root reaches the host API, and only the host the guest API: the app's containers
    (other uids, sharing the VM's network) are refused. BootError when a rule cannot be set:
    without them an app could extend RTMR3 and send boot notices behind the boot's back."""
    rules = [
        ["-A", "OUTPUT", "-d", "10.0.2.100", "-m", "owner", "!", "--uid-owner", "0", "-j",
         "REJECT"],
        ["-A", "INPUT", "-p", "tcp", "--dport", str(GUEST_API_PORT), "!", "-i", "eth0", "-j",
         "REJECT"],
    ]  # fmt: skip
    for rule in rules:
        proc = subprocess.run(["iptables", *rule], capture_output=True, check=False)
        if proc.returncode != 0:
            detail = proc.stderr.decode(errors="replace").strip()[-200:]
            raise BootError(f"cannot set the guest firewall ({' '.join(rule)}): {detail}")


def _read_sys_config() -> SysConfig:
    try:
        return SysConfig.load(HOST_SHARED / hs.SYS_CONFIG)
    except SysConfigError as e:
        raise BootError(f"cannot read the sys-config: {e}") from e


async def boot_and_run() -> int:
    for d in (WORK, PERSISTENT):
        d.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _power_button(loop, stop)
    host: HostApi | None = None
    servers: list[PrpcServer | Http1Server] = []
    compose: PodmanCompose | None = None
    storage: LuksStorage | None = None
    gateway: gateway_client.GatewayClient | None = None
    reported = False
    try:
        sys_config = _read_sys_config()
        host = HostApi(host_api_base(sys_config.host_api_url))
        _firewall()
        compose_raw = (HOST_SHARED / hs.APP_COMPOSE).read_bytes()
        tdx = find_tdx(sys_config)
        booter = Booter(tdx, HOST_SHARED, WORK, host.notify)
        storage = LuksStorage(
            DATA_DISK, PERSISTENT, host.notify, ephemeral=_key_provider(compose_raw) == "none"
        )
        try:
            result: BootResult = await booter.run(storage_fs="ext4", storage=storage)
        except BootError:
            reported = True
            raise
        runtime = await start_runtime(
            tdx,  # type: ignore[arg-type]
            result,
            WORK,
            RUN,
            host.notify,
            socket_group=UID_BASE,
        )
        core, compose_raw, sys_config = runtime.core, runtime.compose_raw, runtime.sys_config
        servers.extend(runtime.servers)
        gateway = runtime.gateway
        app = AppCompose.parse(compose_raw)
        await host.notify("boot.progress", "setting up docker")
        project = ComposeProject.parse(
            app.docker_compose_file, _project_name(app.name), dict(result.envs), policy=STRICT
        )
        graph = PERSISTENT / "containers"
        new_storage = not graph.exists()
        graph.mkdir(mode=0o700, exist_ok=True)
        storage_conf = DSTACK / "storage.conf"
        storage_conf.write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{graph}"\n'
            f'runroot = "{RUN / "containers"}"\n'
        )
        compose = PodmanCompose(
            project,
            storage_conf=storage_conf,
            new_storage=new_storage,
            registries_conf=registries_conf(sys_config.docker_registry),
            volumes_dir=app_owned_dir(PERSISTENT / "volumes", UID_BASE),
            binds_dir=app_owned_dir(PERSISTENT / "binds", UID_BASE),
            userns=(UID_BASE, USERNS_SIZE),
        )
        api = GuestApi(core, compose, stop, data_mount=PERSISTENT, os_name="pydstack-qemu")
        gserver = Http1Server(response_headers=RESPONSE_HEADERS)
        gserver.mount(PrpcService(GUEST_API_SERVICE, api, prefix="/api"))
        await gserver.listen_tcp("0.0.0.0", GUEST_API_PORT)
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
        await host.notify("shutdown.progress", "stopping containers")
        await compose.down()
        await host.notify("shutdown.progress", "powering off")
        return 0
    except (BootError, ComposeError, RpcError, OSError) as e:
        if not reported and host is not None:
            await host.notify("boot.error", str(e))
        log.error("boot failed: %s", e)
        if compose is not None:
            await compose.down(timeout=2)
        return 1
    except Exception as e:  # a bug: still tell the host instead of dying silently
        log.exception("boot failed unexpectedly")
        if not reported and host is not None:
            await host.notify("boot.error", f"internal error: {type(e).__name__}: {e}")
        if compose is not None:
            await compose.down(timeout=2)
        return 1
    finally:
        if gateway is not None:
            await gateway.close()
        for s in servers:
            await s.close()
        if host is not None:
            await host.client.close()
        if storage is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(storage.close)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    log.info(
        "pydstack qemu guest %s on %s booting (%.1f s after the kernel)",
        __version__,
        socket.gethostname(),
        uptime(),
    )
    return asyncio.run(boot_and_run())


if __name__ == "__main__":
    sys.exit(main())
