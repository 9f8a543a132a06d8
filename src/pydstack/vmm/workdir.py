"""a VM's directory on the host: `vm-manifest.json`, `vm-state.json` and the host share.

`<run_path>/<vm-id>/` holds the manifest (what the VM is), the desired state (`{"started":
bool}`), and `shared/` with the files the guest copies at boot (app-compose.json,
.sys-config.json, .encrypted-env, .user-config, .instance_info). Writes are atomic (temp file +
rename) so a crashed VMM never leaves half a file; `.removing` marks a removal in progress, which
the VMM finishes (stopping the CVM first) when it finds one at start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import struct
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydstack.errors import InputError
from pydstack.types import hostshare as hs

from .compose import PortMapping

MAX_MANIFEST = 1024 * 1024
REMOVING = ".removing"


class WorkDirError(InputError):
    """a VM directory or manifest is malformed."""


#: `FS_IOC_GETFLAGS` / `FS_IOC_SETFLAGS` and `FS_TOPDIR_FL` (linux/fs.h); the flags are an int
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000


def spread_subdirectories(path: Path) -> bool:
    """mark `path` as the top of unrelated directory trees (`chattr +T`), so that ext2/3/4 put
    each new subdirectory, and the files under it, in a block group of its own rather than
    the parent's. A VM directory holds a container store of thousands of files, created by a
    boot often seconds after a removed VM's store was deleted. On ext4 without a journal,
    every new inode in a group skips past the inodes deleted there in the last minute, reading
    each one's table block: a 900-file image pulled right after a removal then took twice as
    long. False, and nothing changed, where the filesystem has no such flag."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        (flags,) = struct.unpack("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, b"\0" * 4))
        if not flags & _FS_TOPDIR_FL:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("i", flags | _FS_TOPDIR_FL))
        return True
    except OSError:  # not ext2/3/4 (ENOTTY, EOPNOTSUPP) or not permitted
        return False
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class NetworkSpec:
    """one network interface a VM asked for: `mode` ("" = the backend's default) and, for a
    bridge, its name ("" = the backend's default bridge)."""

    mode: str = ""
    bridge_name: str = ""


@dataclass(frozen=True)
class GpuSelection:
    """the GPUs a VM asked for: `attach_mode` "listed" (the `slots`) or "all"."""

    attach_mode: str = "listed"
    slots: tuple[str, ...] = ()

    @property
    def any(self) -> bool:
        return self.attach_mode == "all" or bool(self.slots)


@dataclass
class VmManifest:
    id: str
    name: str
    app_id: str
    vcpu: int = 1
    memory: int = 1024
    disk_size: int = 20
    image: str = ""
    port_map: list[PortMapping] = field(default_factory=list)
    created_at_ms: int = 0
    kms_urls: list[str] = field(default_factory=list)
    gateway_urls: list[str] = field(default_factory=list)
    no_tee: bool = False
    simulated_tee: str | None = None
    #: empty: one interface in the backend's default mode
    networks: list[NetworkSpec] = field(default_factory=list)
    hugepages: bool = False
    pin_numa: bool = False
    gpus: GpuSelection = field(default_factory=GpuSelection)

    def to_json(self) -> str:
        obj = asdict(self)
        obj["port_map"] = [
            {"address": p.address, "protocol": p.protocol, "from": p.host_port, "to": p.vm_port}
            for p in self.port_map
        ]
        obj["gpus"] = {"attach_mode": self.gpus.attach_mode, "slots": list(self.gpus.slots)}
        return json.dumps(obj, indent=2)

    @classmethod
    def from_json(cls, data: bytes | str) -> VmManifest:
        if len(data) > MAX_MANIFEST:
            raise WorkDirError("vm manifest too large")
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict):
                raise WorkDirError("vm manifest must be a json object")
            gpus = obj.get("gpus") or {}
            ports = [
                PortMapping(
                    p["protocol"], p.get("address", "127.0.0.1"), int(p["from"]), int(p["to"])
                )
                for p in obj.get("port_map", [])
            ]
            return cls(
                id=str(obj["id"]),
                name=str(obj["name"]),
                app_id=str(obj["app_id"]),
                vcpu=int(obj.get("vcpu", 1)),
                memory=int(obj.get("memory", 1024)),
                disk_size=int(obj.get("disk_size", 20)),
                image=str(obj.get("image", "")),
                port_map=ports,
                created_at_ms=int(obj.get("created_at_ms", 0)),
                kms_urls=[str(u) for u in obj.get("kms_urls", [])],
                gateway_urls=[str(u) for u in obj.get("gateway_urls", [])],
                no_tee=bool(obj.get("no_tee", False)),
                simulated_tee=obj.get("simulated_tee"),
                networks=[
                    NetworkSpec(str(n.get("mode", "")), str(n.get("bridge_name", "")))
                    for n in obj.get("networks", [])
                ],
                hugepages=bool(obj.get("hugepages", False)),
                pin_numa=bool(obj.get("pin_numa", False)),
                gpus=GpuSelection(
                    str(gpus.get("attach_mode", "listed")),
                    tuple(str(s) for s in gpus.get("slots", [])),
                ),
            )
        except WorkDirError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise WorkDirError(f"invalid vm manifest: {e}") from e


SHARED_FILES = hs.SHARED_NAMES


class VmWorkDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._started: bool | None = None
        self._instance: tuple[int, str] = (-1, "")

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def shared(self) -> Path:
        return self.path / "shared"

    @property
    def removing(self) -> bool:
        """a removal was started (and maybe interrupted): the VMM finishes it."""
        return (self.path / REMOVING).exists()

    def mark_removing(self) -> None:
        (self.path / REMOVING).touch()

    @classmethod
    def create(cls, run_path: Path, manifest: VmManifest, files: dict[str, bytes]) -> VmWorkDir:
        """a new VM directory with its manifest and host share; nothing is left on failure."""
        unknown = set(files) - set(SHARED_FILES)
        if unknown:
            raise WorkDirError(f"unknown host-share files: {', '.join(sorted(unknown))}")
        final = run_path / manifest.id
        if final.exists():
            raise WorkDirError(f"vm {manifest.id} already exists")
        staging = run_path / f".creating-{manifest.id}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            (staging / "shared").mkdir(parents=True)
            wd = cls(staging)
            manifest.created_at_ms = manifest.created_at_ms or int(time.time() * 1000)
            wd.save_manifest(manifest)
            wd.set_started(False)
            for name, data in files.items():
                secret = name in hs.SECRET_NAMES
                atomic_write(wd.shared / name, data, 0o600 if secret else 0o644)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls(final)

    def manifest(self) -> VmManifest:
        return VmManifest.from_json((self.path / "vm-manifest.json").read_bytes())

    def save_manifest(self, m: VmManifest) -> None:
        atomic_write(self.path / "vm-manifest.json", m.to_json().encode())

    def started(self) -> bool:
        """the desired state; read from disk once, then kept (only this object writes it)."""
        if self._started is None:
            try:
                doc = json.loads((self.path / "vm-state.json").read_text())
                self._started = bool(doc.get("started"))
            except (OSError, ValueError, AttributeError):
                return False
        return self._started

    def set_started(self, started: bool) -> None:
        atomic_write(self.path / "vm-state.json", json.dumps({"started": started}).encode())
        self._started = started

    def instance_id(self) -> str:
        """the instance id the guest reported (`.instance_info`), reread only when it changes."""
        path = self.shared / hs.INSTANCE_INFO
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            return ""
        if stamp != self._instance[0]:
            iid = ""
            with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
                value = json.loads(path.read_bytes() or b"{}").get("instance_id", "")
                iid = value if isinstance(value, str) else ""
            self._instance = (stamp, iid)
        return self._instance[1]

    def write_shared(self, name: str, data: bytes) -> None:
        if name not in SHARED_FILES:
            raise WorkDirError(f"unknown host-share file {name}")
        secret = name in hs.SECRET_NAMES
        atomic_write(self.shared / name, data, 0o600 if secret else 0o644)

    def read_shared(self, name: str) -> bytes | None:
        try:
            return (self.shared / name).read_bytes()
        except FileNotFoundError:
            return None

    def remove(self) -> None:
        self.mark_removing()
        shutil.rmtree(self.path)

    @staticmethod
    def scan(run_path: Path) -> list[VmWorkDir]:
        """the VM directories under run_path, those being removed included (`removing`):
        their CVM may still run, so the caller stops it before deleting them. Interrupted
        creations, and removals whose manifest is unreadable (no CVM can be found for them),
        are deleted here."""
        out: list[VmWorkDir] = []
        if not run_path.is_dir():
            return out
        for entry in sorted(run_path.iterdir()):
            if entry.name.startswith(".creating-"):
                shutil.rmtree(entry, ignore_errors=True)
            elif (entry / REMOVING).exists():
                try:
                    VmWorkDir(entry).manifest()
                    out.append(VmWorkDir(entry))
                except (OSError, WorkDirError):
                    shutil.rmtree(entry, ignore_errors=True)
            elif (entry / "vm-manifest.json").is_file():
                out.append(VmWorkDir(entry))
        return out


def new_vm_id() -> str:
    return str(uuid.uuid4())


def manifest_obj(m: VmManifest) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(m.to_json())
    return obj
