"""the CVM's persistent storage without dm-crypt: a gocryptfs volume keyed by the KMS disk key
(FUSE), created on first boot and reopened afterwards. A VM backend with a kernel of its own
uses LUKS instead; this is for backends that share the host's kernel."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
from pathlib import Path

from .boot import BootError
from .hostapi import HostApi


def sh(*args: str, stdin: bytes | None = None) -> None:
    """run a command; its output goes to a file, so a daemon it leaves behind cannot block us."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.run(args, input=stdin, stdout=out, stderr=out, check=False)
        if proc.returncode != 0:
            out.seek(0)
            err = out.read(1 << 20).decode(errors="replace").strip()
            raise BootError(f"{args[0]} failed: {err[-1000:]}")


class Storage:
    """gocryptfs over `<wd>/data`, mounted at /run/dstack/persistent, keyed by the disk key."""

    def __init__(
        self,
        wd: Path,
        notify: HostApi,
        scrypt_n: int,
        ephemeral: bool,
        shared: bool = False,
        mount_point: Path = Path("/run/dstack/persistent"),
    ) -> None:
        self.cipher = wd / "data"
        self.mount_point = mount_point
        self.notify = notify
        self.scrypt_n = scrypt_n
        #: let the app's user-namespaced containers (other uids) use the mount
        self.shared = shared
        self.ephemeral = ephemeral  # key provider none: new keys every boot, so a new disk

    async def __call__(self, disk_key: bytes) -> None:
        if not disk_key:
            raise BootError("the key provider gave no disk key")
        password = disk_key.hex().encode()
        self.cipher.mkdir(mode=0o700, exist_ok=True)
        if self.ephemeral or not (self.cipher / "gocryptfs.conf").exists():
            await self.notify.notify("boot.progress", "initializing data disk")
            for leftover in self.cipher.iterdir():  # a half-initialized disk from a crash
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
            await asyncio.to_thread(
                sh,
                "gocryptfs",
                "-init",
                "-q",
                "-nosyslog",
                "-scryptn",
                str(self.scrypt_n),
                "-passfile",
                "/dev/stdin",
                str(self.cipher),
                stdin=password,
            )
        else:
            await self.notify.notify("boot.progress", "mounting data disk")
        try:
            await asyncio.to_thread(
                sh,
                "gocryptfs",
                "-q",
                "-nosyslog",
                *(["-allow_other"] if self.shared else []),
                "-passfile",
                "/dev/stdin",
                str(self.cipher),
                str(self.mount_point),
                stdin=password,
            )
        except BootError as e:
            if "Password incorrect" in str(e):
                raise BootError(
                    "cannot open the data disk: the disk key does not match (another app or kms?)"
                ) from None
            raise
