"""the `dstack` CLI's local commands and argument checks (no VMM needed)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pydstack.vmm import cli, discovery


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DSTACK_VMM_URL", raising=False)
    # discovery only sees this test's instances
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    monkeypatch.setattr(discovery, "SCAN_GLOB", str(tmp_path / "none" / "*"))
    return tmp_path


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(args))
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compose_writes_upstream_bytes_and_prints_the_hash(capsys, tmp_path):
    (tmp_path / "dc.yml").write_text("services:\n  a:\n    image: x\n")
    (tmp_path / "env").write_text("# comment\nA=1\nB = two \n")
    out_path = tmp_path / "app-compose.json"
    code, out, _ = run(
        capsys, "compose", "--name", "demo", "--docker-compose", str(tmp_path / "dc.yml"),
        "--kms", "--env-file", str(tmp_path / "env"), "--output", str(out_path),
    )  # fmt: skip
    assert code == 0
    raw = out_path.read_bytes()
    assert f"Compose hash: {hashlib.sha256(raw).hexdigest()}" in out
    doc = json.loads(raw)
    assert list(doc)[:4] == ["manifest_version", "name", "runner", "docker_compose_file"]
    assert doc["allowed_envs"] == ["A", "B"] and doc["kms_enabled"] is True
    assert raw.startswith(b'{\n    "manifest_version": 2,')


def test_env_file_without_kms_is_refused(capsys, tmp_path):
    (tmp_path / "dc.yml").write_text("services: {}\n")
    (tmp_path / "env").write_text("A=1\n")
    code, _, err = run(
        capsys, "compose", "--name", "d", "--docker-compose", str(tmp_path / "dc.yml"),
        "--env-file", str(tmp_path / "env"), "--output", str(tmp_path / "o.json"),
    )  # fmt: skip
    assert code == 1 and err.startswith("error: --env-file needs --kms")
    assert not (tmp_path / "o.json").exists()


def test_kms_signer_whitelist(capsys, home):
    key = "02" + "ab" * 32
    assert run(capsys, "kms", "list")[1].startswith("no trusted kms signers")
    assert run(capsys, "kms", "add", "0x" + key)[0] == 0
    assert run(capsys, "kms", "add", key)[0] == 0  # idempotent
    doc = json.loads((home / ".dstack-vmm/kms-whitelist.json").read_text())
    assert doc == {"trusted_signers": [key]}
    assert run(capsys, "kms", "list")[1].split() == [key]
    code, _, err = run(capsys, "kms", "add", "04" + "ab" * 32)
    assert code == 1 and "compressed secp256k1" in err
    code, _, err = run(capsys, "kms", "add", "zz")
    assert code == 1 and "hex" in err
    assert run(capsys, "kms", "remove", key)[0] == 0
    code, _, err = run(capsys, "kms", "remove", key)
    assert code == 1 and "not a trusted kms signer" in err


def test_unreachable_vmm_is_a_clear_error(capsys):
    code, _, err = run(capsys, "--url", "http://127.0.0.1:1", "lsvm")
    assert code == 1 and err.startswith("error: cannot reach the vmm at http://127.0.0.1:1")


def test_half_configured_basic_auth_is_refused(capsys):
    code, _, err = run(capsys, "--url", "http://127.0.0.1:1", "--auth-user", "u", "lsvm")
    assert code == 1 and "both --auth-user and --auth-password" in err


def test_url_resolution_order(home, monkeypatch):
    assert cli.resolve_url(None) == "http://localhost:8080"
    (home / ".dstack-vmm").mkdir()
    (home / ".dstack-vmm/config.json").write_text('{"url": "http://cfg:1"}')
    assert cli.resolve_url(None) == "http://cfg:1"
    monkeypatch.setenv("DSTACK_VMM_URL", "unix:/run/vmm.sock")
    assert cli.resolve_url(None) == "unix:/run/vmm.sock"
    assert cli.resolve_url("http://explicit:2") == "http://explicit:2"


def test_table_output():
    text = cli.table(["A", "Long header"], [["x", "y"], ["wider cell", ""]])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert "| wider cell |" in text and "| Long header |" in text


def _announce(home, pid: int, address: str, started: int) -> str:
    d = home / "xdg" / "dstack-vmm"
    d.mkdir(parents=True, exist_ok=True)
    vid = f"{started:08x}-0000-4000-8000-000000000000"
    info = {
        "id": vid, "pid": pid, "address": address, "working_dir": "/srv/vmm",
        "config_file": None, "image_path": "/i", "run_path": "/r", "node_name": f"n{started}",
        "version": "0.1.0", "started_at": started,
    }  # fmt: skip
    (d / f"{vid}.json").write_text(json.dumps(info))
    return vid


def test_discovered_vmms_list_switch_and_resolve(capsys, home):
    import os

    dead = _announce(home, 2**22 + 12345, "0.0.0.0:9080", 1)  # no such process
    assert run(capsys, "vmm", "ls")[1].startswith("no running dstack-vmm")
    assert not (home / "xdg/dstack-vmm" / f"{dead}.json").exists()  # stale file cleaned
    first = _announce(home, os.getpid(), "0.0.0.0:9080", 2)
    assert cli.resolve_url(None) == "http://127.0.0.1:9080"  # the only one
    second = _announce(home, os.getpid(), "unix:./vmm.sock", 3)
    assert cli.resolve_url(None) == cli.DEFAULT_URL  # ambiguous without a choice
    out = run(capsys, "vmm", "ls")[1]
    assert first[:8] in out and "unix:/srv/vmm/vmm.sock" in out
    assert run(capsys, "vmm", "switch", second[:8])[0] == 0
    assert cli.resolve_url(None) == "unix:/srv/vmm/vmm.sock"
    assert "*" in run(capsys, "vmm", "ls")[1]
    code, _, err = run(capsys, "vmm", "switch", "ffff")
    assert code == 1 and "no running dstack-vmm matches" in err
    listed = json.loads(run(capsys, "vmm", "ls", "--json")[1])
    assert [i["id"] for i in listed] == [first, second]


def test_register_and_unregister(home):
    path = discovery.register("127.0.0.1:1", None, Path("/i"), Path("/r"), "node", "0.1.0")
    assert path is not None and path.parent == home / "xdg" / "dstack-vmm"
    [inst] = discovery.instances()
    assert inst.url == "http://127.0.0.1:1" and inst.node_name == "node"
    discovery.unregister(path)
    assert discovery.instances() == []
