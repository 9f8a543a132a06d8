"""the `dstack` CLI's local commands and argument checks (no VMM needed)."""

from __future__ import annotations

import hashlib
import json

import pytest

from pydstack.vmm import cli


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("DSTACK_VMM_URL", raising=False)
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
