"""running dstack-vmm instances announce themselves so `dstack` finds them without `--url`.

Each VMM writes `$XDG_RUNTIME_DIR/dstack-vmm/<uuid>.json` (else `/run/user/<uid>/dstack-vmm`)
with upstream's fields and removes it on exit; `dstack vmm ls` lists the instances whose
process is still alive, and `dstack vmm switch` picks one.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("dstack-vmm")

#: where every user's instances are looked for
SCAN_GLOB = "/run/user/*/dstack-vmm"
MAX_FILE = 64 * 1024


def discovery_dir() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "dstack-vmm"
    return Path(f"/run/user/{os.getuid()}/dstack-vmm")


@dataclass(frozen=True)
class VmmInstance:
    id: str
    pid: int
    address: str
    working_dir: str
    config_file: str | None
    image_path: str
    run_path: str
    node_name: str
    version: str
    started_at: int

    @property
    def url(self) -> str:
        """what a client connects to: `unix:/abs/path` or `http://host:port`."""
        if self.address.startswith("unix:"):
            path = self.address[5:]
            return "unix:" + (path if path.startswith("/") else str(Path(self.working_dir, path)))
        host, _, port = self.address.removeprefix("tcp:").rpartition(":")
        host = "127.0.0.1" if host in ("0.0.0.0", "", "::", "[::]") else host
        return f"http://{host}:{port}"


def register(
    address: str,
    config_file: Path | None,
    image_path: Path,
    run_path: Path,
    node_name: str,
    version: str,
) -> Path | None:
    """write this process's registration; None (logged) when the directory is not writable."""
    info = VmmInstance(
        id=str(uuid.uuid4()),
        pid=os.getpid(),
        address=address,
        working_dir=os.getcwd(),
        config_file=str(config_file) if config_file else None,
        image_path=str(image_path),
        run_path=str(run_path),
        node_name=node_name,
        version=version,
        started_at=int(time.time()),
    )
    d = discovery_dir()
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = d / f"{info.id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(info), indent=2))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot register for discovery in %s: %s", d, e)
        return None
    return path


def unregister(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def instances() -> list[VmmInstance]:
    """running instances, oldest first; files of dead processes are removed where allowed."""
    dirs = {Path(p) for p in glob.glob(SCAN_GLOB)} | {discovery_dir()}
    out = []
    for d in dirs:
        for f in sorted(d.glob("*.json")) if d.is_dir() else []:
            try:
                if f.stat().st_size > MAX_FILE:
                    continue
                raw = json.loads(f.read_text())
                inst = VmmInstance(**{k: raw.get(k) for k in VmmInstance.__dataclass_fields__})
                if not isinstance(inst.pid, int) or not isinstance(inst.address, str):
                    continue
            except (OSError, ValueError, TypeError):
                continue
            if not _alive(inst.pid):
                with contextlib.suppress(OSError):
                    f.unlink()
                continue
            out.append(inst)
    return sorted(out, key=lambda i: (i.started_at or 0, i.id))
