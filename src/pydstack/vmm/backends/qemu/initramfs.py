"""the initramfs of a QEMU guest image: busybox, the kernel modules the root filesystem needs, and
an `/init` that mounts the read-only root (squashfs on the first virtio disk) under a tmpfs
overlay and switches to it.

The archive is written here (newc cpio, gzip), not by `cpio`: entries sorted, owned by root,
dated SOURCE_DATE_EPOCH, so the same inputs give the same bytes. A root that cannot be mounted
powers the VM off after saying why on the console (the VMM then shows the VM exited during boot).
"""

from __future__ import annotations

import gzip
import io
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: modules the initramfs loads, in this order (their dependencies first, see `module_files`)
ROOT_MODULES = ("virtio_pci", "virtio_blk", "squashfs", "overlay")

INIT_SCRIPT = """#!/bin/busybox sh
# pydstack guest initramfs: mount the read-only root under a tmpfs overlay, switch to it.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() {
    echo "dstack-initramfs: $*; powering off" > /dev/console
    sync
    echo o > /proc/sysrq-trigger
    sleep 10
}
while read -r mod; do
    insmod "/lib/modules/$mod" 2>/dev/null || true
done < /modules.order
root=/dev/vda
for i in $(seq 1 50); do [ -b "$root" ] && break; sleep 0.1; done
[ -b "$root" ] || fail "no root disk ($root)"
mkdir -p /ro /rw /newroot
mount -t squashfs -o ro "$root" /ro || fail "cannot mount the root filesystem"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "cannot mount the overlay tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/ro,upperdir=/rw/upper,workdir=/rw/work /newroot \\
    || fail "cannot mount the root overlay"
[ -x /newroot/sbin/dstack-init ] || fail "the root filesystem has no /sbin/dstack-init"
umount /sys
umount /proc
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/dstack-init
"""


class InitramfsError(Exception):
    """the initramfs cannot be assembled (a module or busybox is missing)."""


@dataclass(frozen=True)
class Entry:
    name: str
    mode: int
    data: bytes = b""


def _newc(entries: Iterable[Entry], mtime: int) -> bytes:
    out = io.BytesIO()
    ino = 1

    def write(name: str, mode: int, data: bytes) -> None:
        nonlocal ino
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, mtime, len(data), 0, 0, 0, 0, len(encoded), 0]
        out.write(b"070701" + b"".join(f"{v:08x}".encode() for v in fields))
        out.write(encoded)
        out.write(b"\0" * (-(110 + len(encoded)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
        ino += 1

    for e in sorted(entries, key=lambda e: e.name):
        write(e.name, e.mode, e.data)
    write("TRAILER!!!", 0, b"")
    return out.getvalue()


def module_files(rootfs: Path, kver: str, deps: dict[str, list[str]]) -> list[str]:
    """the .ko paths (relative to /lib/modules/<kver>) to load for ROOT_MODULES, dependencies
    first; `deps` is modules.dep parsed (module path -> its dependency paths). Built-in modules
    need nothing. InitramfsError for a module neither built in nor present."""
    builtin = set()
    builtin_file = rootfs / "lib" / "modules" / kver / "modules.builtin"
    if builtin_file.exists():
        builtin = {Path(line).name for line in builtin_file.read_text().split()}
    by_name = {Path(p).name.split(".ko")[0].replace("-", "_"): p for p in deps}
    order: list[str] = []

    def add(path: str) -> None:
        for dep in deps.get(path, []):
            add(dep)
        if path not in order:
            order.append(path)

    for mod in ROOT_MODULES:
        path = by_name.get(mod)
        if path is None:
            if any(b.split(".ko")[0].replace("-", "_") == mod for b in builtin):
                continue
            raise InitramfsError(f"kernel module {mod} is neither built in nor in the rootfs")
        add(path)
    return order


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        deps[mod.strip()] = rest.split()
    return deps


def build_initramfs(rootfs: Path, kver: str, busybox: Path, mtime: int) -> bytes:
    """the gzip'd initramfs for the kernel `kver` of `rootfs`."""
    moddir = rootfs / "lib" / "modules" / kver
    try:
        deps = parse_modules_dep((moddir / "modules.dep").read_text())
        bb = busybox.read_bytes()
    except OSError as e:
        raise InitramfsError(f"cannot assemble the initramfs: {e}") from e
    mods = module_files(rootfs, kver, deps)
    dirs = {"bin", "dev", "proc", "sys", "lib", "lib/modules", "ro", "rw", "newroot"}
    entries = [Entry(d, stat.S_IFDIR | 0o755) for d in dirs]
    entries.append(Entry("bin/busybox", stat.S_IFREG | 0o755, bb))
    entries.append(Entry("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode()))
    flat = []
    for m in mods:
        data = (moddir / m).read_bytes()
        name = Path(m).name
        if name.endswith(".xz") or name.endswith(".zst"):
            raise InitramfsError(f"compressed kernel module {name} is not supported")
        flat.append(name)
        entries.append(Entry(f"lib/modules/{name}", stat.S_IFREG | 0o644, data))
    entries.append(
        Entry("modules.order", stat.S_IFREG | 0o644, "".join(f"{n}\n" for n in flat).encode())
    )
    raw = _newc(entries, mtime)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as gz:
        gz.write(raw)
    return buf.getvalue()
