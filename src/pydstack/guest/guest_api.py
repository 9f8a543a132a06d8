"""what the VMM may ask a CVM (upstream's `guest_api`: Info, SysInfo, NetworkInfo,
ListContainers, Shutdown), served on the CVM's guest-API socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import time
from pathlib import Path

from google.protobuf.empty_pb2 import Empty

from pydstack import __version__
from pydstack.rpc.calls import CallContext
from pydstack.rpc.proto import guest_api_pb2 as gpb

from .compose_runner import PodmanCompose
from .core import GuestCore


def _mem_info() -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, _, v = line.partition(":")
            out[k] = int(v.split()[0]) * 1024
    return out


class GuestApi:
    """what the VMM may ask the CVM (upstream guest_api: Info, SysInfo, NetworkInfo, ...)."""

    def __init__(
        self,
        core: GuestCore,
        compose: PodmanCompose | None,
        stop: asyncio.Event,
        *,
        data_mount: Path,
        os_name: str,
    ) -> None:
        self.core = core
        self.data_mount = data_mount
        self.os_name = os_name
        self.compose = compose
        self.stop = stop
        self.shutdown_requested = False
        self.started = time.time()

    async def Info(self, _: Empty, ctx: CallContext) -> gpb.GuestInfo:
        info = await asyncio.to_thread(self.core.info, external=True)
        return gpb.GuestInfo(
            version=__version__,
            app_id=info.app_id,
            instance_id=info.instance_id,
            app_cert=info.app_cert,
            tcb_info=info.tcb_info,
            device_id=info.device_id,
        )

    async def SysInfo(self, _: Empty, ctx: CallContext) -> gpb.SystemInfo:
        mem = _mem_info()
        load = os.getloadavg()
        disks = []
        for name, mount in (("rootfs", "/"), ("data", str(self.data_mount))):
            with contextlib.suppress(OSError):
                st = os.statvfs(mount)
                disks.append(
                    gpb.DiskInfo(
                        name=name,
                        mount_point=mount,
                        total_size=st.f_blocks * st.f_frsize,
                        free_size=st.f_bavail * st.f_frsize,
                    )
                )
        total, avail = mem.get("MemTotal", 0), mem.get("MemAvailable", 0)
        return gpb.SystemInfo(
            os_name=self.os_name,
            os_version=__version__,
            kernel_version=platform.release(),
            cpu_model=platform.processor() or platform.machine(),
            num_cpus=os.cpu_count() or 1,
            total_memory=total,
            available_memory=avail,
            used_memory=total - avail,
            free_memory=mem.get("MemFree", 0),
            total_swap=mem.get("SwapTotal", 0),
            free_swap=mem.get("SwapFree", 0),
            used_swap=mem.get("SwapTotal", 0) - mem.get("SwapFree", 0),
            uptime=int(time.time() - self.started),
            loadavg_one=int(load[0] * 100),
            loadavg_five=int(load[1] * 100),
            loadavg_fifteen=int(load[2] * 100),
            disks=disks,
        )

    async def NetworkInfo(self, req: Empty, ctx: CallContext) -> gpb.NetworkInformation:
        out = gpb.NetworkInformation()
        proc = await asyncio.create_subprocess_exec(
            "ip", "-j", "addr", stdout=asyncio.subprocess.PIPE
        )
        text, _err = await proc.communicate()
        with contextlib.suppress(ValueError):
            for link in json.loads(text or b"[]"):
                iface = gpb.Interface(name=str(link.get("ifname", "")))
                for a in link.get("addr_info", []):
                    iface.addresses.append(
                        gpb.IpAddress(address=str(a.get("local")), prefix=int(a.get("prefixlen")))
                    )
                stats = Path(f"/sys/class/net/{iface.name}/statistics")
                for f in ("rx_bytes", "tx_bytes", "rx_errors", "tx_errors"):
                    with contextlib.suppress(OSError, ValueError):
                        setattr(iface, f, int((stats / f).read_text()))
                out.interfaces.append(iface)
        proc = await asyncio.create_subprocess_exec(
            "ip", "-j", "route", "show", "default", stdout=asyncio.subprocess.PIPE
        )
        text, _err = await proc.communicate()
        with contextlib.suppress(ValueError):
            for r in json.loads(text or b"[]"):
                if r.get("gateway"):
                    out.gateways.append(gpb.Gateway(address=str(r["gateway"])))
        return out

    async def ListContainers(self, _: Empty, ctx: CallContext) -> gpb.ListContainersResponse:
        out = gpb.ListContainersResponse()
        if self.compose is None:
            return out
        for c in await self.compose.ps():
            out.containers.append(
                gpb.Container(
                    id=str(c.get("Id", "")),
                    names=[str(n) for n in c.get("Names", [])],
                    image=str(c.get("Image", "")),
                    image_id=str(c.get("ImageID", "")),
                    created=int(c.get("Created", 0) or 0),
                    state=str(c.get("State", "")),
                    status=str(c.get("Status", "")),
                )
            )
        return out

    async def Shutdown(self, _: Empty, ctx: CallContext) -> Empty:
        self.shutdown_requested = True
        self.stop.set()
        return Empty()


GUEST_API_SERVICE = gpb.DESCRIPTOR.services_by_name["GuestApi"]
