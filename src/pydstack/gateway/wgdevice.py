"""the gateway's WireGuard interface on this host (§3.1), through ``ip`` and ``wg``.

:meth:`WgDevice.ensure` creates the interface when ``ip link show`` does not find it: the
kernel's ``type wireguard`` where the module is present, else ``wireguard-go`` (userspace, over
/dev/net/tun; it detaches and lives as long as the interface), then gives it ``core.wg.ip`` and
sets it up. An interface that exists is kept (its peers are replaced by the next
:meth:`WgDevice.apply`), so a restarted gateway does not cut the tunnels. :meth:`WgDevice.apply`
writes the rendered config atomically with mode 0600 to ``core.wg.config_path`` and runs
``wg syncconf``. :meth:`WgDevice.latest_handshakes` runs ``wg show <if> latest-handshakes``.
Failures are :class:`WgError` with the tool's own message; no key ever appears in one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

from pydstack.errors import DstackError

from .wgconf import parse_latest_handshakes

log = logging.getLogger(__name__)

#: how long one ``ip``/``wg`` command may take
COMMAND_TIMEOUT = 30.0


class WgError(DstackError):
    """a WireGuard command failed."""


async def run(*args: str, timeout: float = COMMAND_TIMEOUT, daemon: bool = False) -> str:
    """stdout of a command; WgError with its stderr when it fails or is missing. A `daemon`
    (wireguard-go, which detaches) gets no pipes: its lasting child would hold them open."""
    if shutil.which(args[0]) is None:
        raise WgError(f"{args[0]} is not installed (Debian: wireguard-tools, wireguard-go)")
    out_to = asyncio.subprocess.DEVNULL if daemon else asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=out_to, stderr=out_to
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise WgError(f"{' '.join(args[:3])} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        why = (err or b"").decode(errors="replace").strip()[-500:]
        raise WgError(f"{' '.join(args[:4])}: {why or f'exit status {proc.returncode}'}")
    return (out or b"").decode(errors="replace")


def write_private(path: Path, text: str) -> None:
    """write `text` to `path` atomically with mode 0600 (the directory made 0700 if missing)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class WgDevice:
    """one WireGuard interface: `interface` with `address` (CIDR), config at `config_path`."""

    def __init__(self, interface: str, address: str, config_path: Path) -> None:
        if not 0 < len(interface) <= 15 or "/" in interface or interface in (".", ".."):
            raise WgError(f"invalid interface name {interface!r}")
        self.interface = interface
        self.address = address
        self.config_path = config_path
        #: how the interface came to be: "existing", "kernel" or "wireguard-go"
        self.kind = ""

    async def exists(self) -> bool:
        try:
            await run("ip", "link", "show", self.interface)
        except WgError:
            return False
        return True

    async def ensure(self) -> str:
        """the interface up with its address; returns how it was made (WgError on failure)."""
        if await self.exists():
            self.kind = "existing"
            return self.kind
        try:
            await run("ip", "link", "add", self.interface, "type", "wireguard")
            self.kind = "kernel"
        except WgError as e:
            log.info("no kernel wireguard (%s); starting wireguard-go", e)
            await run("wireguard-go", self.interface, daemon=True)
            self.kind = "wireguard-go"
        try:
            await run("ip", "address", "add", self.address, "dev", self.interface)
            await run("ip", "link", "set", self.interface, "up")
        except WgError:
            await self.delete()
            raise
        log.info("wireguard interface %s (%s) is up: %s", self.interface, self.kind, self.address)
        return self.kind

    async def apply(self, config: str) -> None:
        """write `config` (0600, atomically) and ``wg syncconf`` it (WgError on failure)."""
        await asyncio.to_thread(write_private, self.config_path, config)
        await run("wg", "syncconf", self.interface, str(self.config_path))

    async def latest_handshakes(self) -> dict[str, float]:
        return parse_latest_handshakes(await run("wg", "show", self.interface, "latest-handshakes"))

    async def delete(self) -> None:
        """remove the interface (a wireguard-go daemon exits with it); no error if absent."""
        try:
            await run("ip", "link", "del", self.interface)
        except WgError as e:
            log.debug("deleting %s: %s", self.interface, e)
