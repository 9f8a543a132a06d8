"""a sandbox CVM's resource limits: its vcpu and memory, as a cgroup around all its processes.

The CVM's cgroup nests under the launcher's own (delegation, as systemd would do it), at the same
relative path in every controller used, so the guest can hand that path to podman as
`--cgroup-parent` and the app's containers count against the CVM's limits too. cgroup v1
(memory, cpu, pids controllers) and v2 (unified) are supported; where neither can be written
the CVM runs unconstrained, with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("dstack-sandbox")

ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "cpu", "pids")
CFS_PERIOD_US = 100_000
#: where a CVM's cgroup is recorded in its VM directory
CGROUP_FILE = "cgroup.json"


class CgroupError(OSError):
    """the CVM's cgroup cannot be set up."""


def _own_path(controller: str, proc_cgroup: str) -> str:
    """this process's path in a v1 `controller` hierarchy (or v2 with controller "")."""
    for line in proc_cgroup.splitlines():
        hid, ctrls, path = line.split(":", 2)
        if controller == "" and hid == "0" and ctrls == "":
            return path
        if controller and controller in ctrls.split(","):
            return path
    return "/"


def is_v2() -> bool:
    return (ROOT / "cgroup.controllers").exists()


@dataclass(frozen=True)
class CvmCgroup:
    """the cgroup path (relative to each hierarchy's root) and the directories it names."""

    path: str
    dirs: tuple[Path, ...]

    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs]

    def join(self, pid: int = 0) -> None:
        """move `pid` (0: the caller) into the CVM's cgroup in every hierarchy."""
        for f in self.procs_files():
            f.write_text(f"{pid or os.getpid()}\n")

    def save(self, path: Path) -> None:
        """record it beside the VM, so whoever stops the CVM can remove it."""
        path.write_text(json.dumps({"path": self.path, "dirs": [str(d) for d in self.dirs]}))

    @classmethod
    def load(cls, path: Path) -> CvmCgroup | None:
        try:
            doc = json.loads(path.read_text())
            dirs = tuple(Path(d) for d in doc["dirs"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        # only ever a cvm cgroup under the cgroup root: the file is not trusted blindly
        if not all(d.is_relative_to(ROOT) and "/dstack/" in str(d) for d in dirs):
            return None
        return cls(str(doc["path"]), dirs)

    def remove(self) -> None:
        """remove the cgroup tree bottom-up once its processes are gone (best effort)."""
        for d in self.dirs:
            if not d.exists():
                continue
            for sub, _, _ in sorted(os.walk(d), key=lambda w: -w[0].count("/")):
                with contextlib.suppress(OSError):
                    os.rmdir(sub)


def create(vm_id: str, vcpu: int, memory_mb: int) -> CvmCgroup:
    """make (or reuse) the CVM's cgroup with its limits; raises CgroupError."""
    with open("/proc/self/cgroup") as f:
        proc = f.read()
    try:
        if is_v2():
            base = _own_path("", proc)
            rel = f"{base.rstrip('/')}/dstack/{vm_id}"
            d = ROOT / rel.lstrip("/")
            d.mkdir(parents=True, exist_ok=True)
            # limits apply only where each ancestor delegates the controllers
            for ancestor in (d.parent.parent, d.parent):
                with contextlib.suppress(OSError):
                    (ancestor / "cgroup.subtree_control").write_text("+memory +cpu +pids")
            (d / "memory.max").write_text(str(memory_mb * 1024 * 1024))
            (d / "cpu.max").write_text(f"{vcpu * CFS_PERIOD_US} {CFS_PERIOD_US}")
            return CvmCgroup(rel, (d,))
        base = _own_path("memory", proc)
        rel = f"{base.rstrip('/')}/dstack/{vm_id}"
        dirs = []
        for ctrl in V1_CONTROLLERS:
            d = ROOT / ctrl / rel.lstrip("/")
            d.mkdir(parents=True, exist_ok=True)
            dirs.append(d)
        mem, cpu = ROOT / "memory" / rel.lstrip("/"), ROOT / "cpu" / rel.lstrip("/")
        (mem / "memory.limit_in_bytes").write_text(str(memory_mb * 1024 * 1024))
        with contextlib.suppress(OSError):  # without swap accounting there is no memsw file
            (mem / "memory.memsw.limit_in_bytes").write_text(str(memory_mb * 1024 * 1024))
        (cpu / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
        (cpu / "cpu.cfs_quota_us").write_text(str(vcpu * CFS_PERIOD_US))
        return CvmCgroup(rel, tuple(dirs))
    except OSError as e:
        raise CgroupError(f"cannot set up the cvm's cgroup: {e}") from e


async def remove_cgroup(workdir: Path) -> None:
    """remove a stopped CVM's cgroup (its processes may take a moment to be reaped)."""
    cg = CvmCgroup.load(workdir / CGROUP_FILE)
    if cg is None:
        return
    for _ in range(30):
        cg.remove()
        if not any(d.exists() for d in cg.dirs):
            return
        await asyncio.sleep(0.1)
    log.warning("cgroup %s is still busy; left in place", cg.path)
