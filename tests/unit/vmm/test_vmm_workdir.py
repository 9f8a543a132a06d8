"""vm directories on disk and what guest notifications do to them."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from pydstack.vmm.compose import PortMapping
from pydstack.vmm.runtime import VmRuntime
from pydstack.vmm.workdir import (
    VmManifest,
    VmWorkDir,
    WorkDirError,
    new_vm_id,
    spread_subdirectories,
)


def manifest(**kw) -> VmManifest:
    return VmManifest(id=kw.pop("id", new_vm_id()), name="web", app_id="ab" * 20, **kw)


def test_create_scan_and_remove(tmp_path):
    m = manifest(port_map=[PortMapping("tcp", "127.0.0.1", 8080, 80)], kms_urls=["https://kms"])
    wd = VmWorkDir.create(tmp_path, m, {"app-compose.json": b"{}", ".encrypted-env": b"\x01\x02"})
    assert wd.manifest() == VmManifest.from_json(wd.manifest().to_json())
    assert wd.manifest().port_map[0].vm_port == 80 and wd.manifest().created_at_ms > 0
    assert not wd.started()
    wd.set_started(True)
    assert VmWorkDir.scan(tmp_path)[0].started()
    assert (wd.shared / ".encrypted-env").stat().st_mode & 0o777 == 0o600
    assert wd.read_shared("app-compose.json") == b"{}" and wd.read_shared(".user-config") is None
    with pytest.raises(WorkDirError, match="already exists"):
        VmWorkDir.create(tmp_path, m, {})
    wd.remove()
    assert VmWorkDir.scan(tmp_path) == []


def test_bad_input_leaves_nothing(tmp_path):
    with pytest.raises(WorkDirError, match="unknown host-share files"):
        VmWorkDir.create(tmp_path, manifest(), {"evil.sh": b""})
    assert list(tmp_path.iterdir()) == []
    (tmp_path / ".creating-x").mkdir()
    half = tmp_path / "y"
    half.mkdir()
    (half / ".removing").touch()
    (half / "vm-manifest.json").write_text("{}")
    assert VmWorkDir.scan(tmp_path) == []
    assert list(tmp_path.iterdir()) == []
    for bad in (b"[]", b"{", b'{"id": 1}', b"x" * (1024 * 1024 + 1)):
        with pytest.raises(WorkDirError):
            VmManifest.from_json(bad)


def test_guest_notifications(tmp_path):
    wd = VmWorkDir.create(tmp_path, manifest(), {"app-compose.json": b"{}"})
    wd.set_started(True)
    rt = VmRuntime(wd)
    rt.notify("boot.progress", "requesting app keys")
    rt.notify("boot.error", "Boot denied: compose hash not allowed")
    info = {"instance_id_seed": "01" * 20, "instance_id": "02" * 20, "app_id": "ab" * 20}
    rt.notify("instance.info", json.dumps(info))
    assert json.loads(wd.read_shared(".instance_info") or b"") == info
    rt.notify("instance.info", '{"instance_id": "not hex"}')
    assert json.loads(wd.read_shared(".instance_info") or b"") == info
    rt.notify("boot.progress", "x" * 5000)
    assert rt.boot_progress == "requesting app keys"
    assert rt.boot_error.startswith("Boot denied")
    rt.notify("shutdown.progress", "powering off")
    assert not wd.started()
    assert [e.event for e in rt.events][:2] == ["boot.progress", "boot.error"]


def inode_flags(path: Path) -> int | None:
    """the directory's inode flags (`lsattr`), None where the filesystem has none."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, 0x80086601, b"\0" * 4))[0])
    except OSError:
        return None
    finally:
        os.close(fd)


def ext4_dir(tmp_path: Path) -> Path:
    """a directory on ext4: tmp_path where it is one, else a small ext4 image the test mounts."""
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True)
    if fs.stdout.strip() == "ext2/ext3":
        return tmp_path
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "16M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    if subprocess.run(["mount", "-o", "loop", str(image), str(mnt)]).returncode != 0:
        pytest.fail("no ext4 directory to test on: tmp_path is not ext4 and a loop mount failed")
    return mnt


@pytest.fixture
def ext4(tmp_path: Path):
    d = ext4_dir(tmp_path)
    yield d
    if d != tmp_path:
        subprocess.run(["umount", str(d)], check=False)


def test_spread_subdirectories_sets_the_top_directory_flag_on_ext4(ext4: Path):
    d = ext4 / "run"
    d.mkdir()
    assert not (inode_flags(d) or 0) & 0x00020000
    assert spread_subdirectories(d)
    flags = inode_flags(d)
    assert flags is not None and flags & 0x00020000
    assert spread_subdirectories(d)  # a second start changes nothing and is no error
    assert inode_flags(d) == flags


def test_spread_subdirectories_elsewhere_changes_nothing(tmp_path: Path):
    # tmpfs keeps a few inode flags but no top-directory one; a missing path is no error either
    shm = Path("/dev/shm") / f"pydstack-test-{os.getpid()}"
    shm.mkdir()
    try:
        before = inode_flags(shm)
        assert not spread_subdirectories(shm)
        assert inode_flags(shm) == before
    finally:
        shm.rmdir()
    assert not spread_subdirectories(tmp_path / "missing")


async def test_vmm_start_spreads_its_vm_directories(ext4: Path, make_app):
    app = await make_app(run_path=ext4 / "vm")
    flags = inode_flags(app.config.run_path)
    assert flags is not None and flags & 0x00020000
