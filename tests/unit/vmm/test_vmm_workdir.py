"""vm directories on disk and what guest notifications do to them."""

from __future__ import annotations

import json

import pytest

from pydstack.vmm.compose import PortMapping
from pydstack.vmm.runtime import VmRuntime
from pydstack.vmm.workdir import VmManifest, VmWorkDir, WorkDirError, new_vm_id


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
