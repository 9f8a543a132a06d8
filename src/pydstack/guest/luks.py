"""a VM guest's persistent storage: the data disk as LUKS2 keyed with the KMS disk key (dm-crypt
in the guest kernel), ext4 inside, as upstream's `dstack-util setup` does.

A new disk is formatted (`cryptsetup luksFormat --type luks2 --cipher aes-xts-plain64`, the
passphrase the hex of the disk key); an existing one is opened after its header is checked (only
aes-xts-plain64 keyslots and segments, so a host cannot hand the guest a `cipher_null` disk that
would store the app's data in the clear). The key is 256 random bits, so it is not stretched:
one pbkdf2 iteration round of 1000 costs nothing and adds nothing.

Errors are :class:`~pydstack.guest.boot.BootError` with what failed; a key that does not open the
disk says so (another app or KMS).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

from .boot import BootError

CIPHER = "aes-xts-plain64"
MAPPER_NAME = "dstack_data_disk"
Notify = Callable[[str, str], Awaitable[None]]


def _run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, input=stdin, capture_output=True, check=False)


def _check(proc: subprocess.CompletedProcess[bytes], what: str) -> None:
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).decode(errors="replace").strip()
        raise BootError(f"{what} failed: {err[-500:]}")


def check_header(dump: str) -> None:
    """BootError unless every keyslot and segment of the LUKS2 header (luksDump json) uses
    aes-xts-plain64."""
    try:
        meta = json.loads(dump)
        slots = meta.get("keyslots", {})
        segments = meta.get("segments", {})
        ciphers = [s["area"]["encryption"] for s in slots.values()]
        ciphers += [s["encryption"] for s in segments.values()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BootError(f"the data disk's luks header is malformed: {e}") from None
    if not ciphers or any(c != CIPHER for c in ciphers):
        raise BootError(f"the data disk's luks header uses a cipher other than {CIPHER}")


class LuksStorage:
    """`device` (the VM's data disk) opened as /dev/mapper/dstack_data_disk, mounted at
    `mount_point`. `ephemeral` (key provider none: new keys each boot) reformats it."""

    def __init__(
        self, device: Path, mount_point: Path, notify: Notify, *, ephemeral: bool = False
    ) -> None:
        self.device = device
        self.mount_point = mount_point
        self.notify = notify
        self.ephemeral = ephemeral
        self.mapper = Path("/dev/mapper") / MAPPER_NAME

    async def __call__(self, disk_key: bytes) -> None:
        if not disk_key:
            raise BootError("the key provider gave no disk key")
        if not self.device.exists():
            raise BootError(f"the data disk {self.device} is missing")
        fresh = self.ephemeral or not await asyncio.to_thread(self._is_luks)
        progress = "initializing data disk" if fresh else "mounting data disk"
        await self.notify("boot.progress", progress)
        await asyncio.to_thread(self._open, disk_key.hex().encode(), fresh)

    def _is_luks(self) -> bool:
        return _run("cryptsetup", "isLuks", str(self.device)).returncode == 0

    def _open(self, passphrase: bytes, fresh: bool) -> None:
        dev = str(self.device)
        if fresh:
            _check(
                _run(
                    "cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2",
                    "--cipher", CIPHER, "--key-size", "512", "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "1000", "--key-file", "-", dev,
                    stdin=passphrase,
                ),
                "formatting the data disk",
            )  # fmt: skip
        else:
            dump = _run("cryptsetup", "luksDump", "--dump-json-metadata", dev)
            _check(dump, "reading the data disk's luks header")
            check_header(dump.stdout.decode(errors="replace"))
        opened = _run(
            "cryptsetup", "open", "--type", "luks2", "--key-file", "-", dev, MAPPER_NAME,
            stdin=passphrase,
        )  # fmt: skip
        if opened.returncode != 0:
            if b"No key available" in opened.stderr:
                raise BootError(
                    "cannot open the data disk: the disk key does not match (another app or kms?)"
                )
            _check(opened, "opening the data disk")
        if fresh:
            _check(
                _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1",
                     str(self.mapper)),
                "making the data disk's filesystem",
            )  # fmt: skip
        else:
            _run("e2fsck", "-p", str(self.mapper))
            _run("resize2fs", str(self.mapper))
        self.mount_point.mkdir(parents=True, exist_ok=True)
        _check(_run("mount", "-t", "ext4", str(self.mapper), str(self.mount_point)), "mounting")

    def close(self) -> None:
        """unmount and close the disk (at power-off); failures are ignored."""
        _run("umount", str(self.mount_point))
        _run("cryptsetup", "close", MAPPER_NAME)
