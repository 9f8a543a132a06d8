"""dstack-verifier as a real process: /verify and /health, offline collateral, a mock root only
when configured, bad input answered with a reason; `--verify FILE`; `dstack verify`."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pydstack.attest.attestation import encode_v0
from pydstack.devstack import free_port
from pydstack.tee.simulated import SimulatedTdx
from pydstack.vmm.backends.sandbox.image import ensure_sandbox_image

from ..unit.attest.test_evidence import SEED, attestation
from .kms_proc import _wait


def _config(d, *, root: bool = True, insecure: bool = True) -> str:
    tdx = SimulatedTdx(SEED)
    (d / "collateral.json").write_text(tdx.collateral_json())
    (d / "root.der").write_bytes(tdx.root_ca_der)
    ensure_sandbox_image(d / "images")
    port = free_port()
    roots = f'[attestation.root_ca]\ntdx = "{d / "root.der"}"\n' if root else ""
    cfg = d / "verifier.toml"
    cfg.write_text(
        f"""address = "127.0.0.1"
port = {port}
image_cache_dir = "{d / "images"}"
image_download_url = ""

[attestation]
insecure_allow_external_trust_anchors = {str(insecure).lower()}
collateral_files = ["{d / "collateral.json"}"]

[attestation.urls]
pccs = ""

{roots}"""
    )
    return str(cfg)


@pytest.fixture(scope="module")
def verifier(tmp_path_factory):
    d = tmp_path_factory.mktemp("verifier")
    cfg = _config(d)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pydstack.verifier.main", "-c", cfg],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = _wait(proc, "listening on").split()[-1]
    yield url, d, cfg
    proc.terminate()
    proc.communicate(timeout=10)


def test_health(verifier):
    url, _, _ = verifier
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "service": "dstack-verifier"}


def test_a_simulated_cvm_verifies_down_to_its_image(verifier):
    url, _, _ = verifier
    r = httpx.post(f"{url}/verify", json={"attestation": encode_v0(attestation()).hex()})
    out = r.json()
    assert r.status_code == 200 and out["is_valid"], out["reason"]
    assert set(out["details"]) >= {
        "quote_verified",
        "event_log_verified",
        "os_image_hash_verified",
        "acpi_tables_verified",
        "tcb_status",
        "advisory_ids",
        "app_info",
        "key_provider",
        "boot_info",
    }
    assert out["reason"] is None


def test_the_lite_fixture_gets_each_check_reported(verifier, vectors):
    url, _, _ = verifier
    body = (vectors / "dstack/verifier_tdx-lite-getquote.json").read_bytes()
    # posted as is, the way upstream's readme does it (curl -d: a form content type)
    r = httpx.post(
        f"{url}/verify", content=body, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    out = r.json()
    d = out["details"]
    assert (d["quote_verified"], d["event_log_verified"], d["os_image_hash_verified"]) == (
        False,
        True,
        True,
    )
    assert not out["is_valid"] and out["reason"].startswith("quote: ")


def test_bad_requests_are_answered_with_a_reason(verifier):
    url, _, _ = verifier
    r = httpx.post(f"{url}/verify", content=b"{not json")
    assert r.status_code == 400 and not r.json()["is_valid"]
    assert "not valid json" in r.json()["reason"]
    truncated = encode_v0(attestation())[:700].hex()
    r = httpx.post(f"{url}/verify", json={"attestation": truncated})
    assert r.status_code == 200 and not r.json()["is_valid"] and r.json()["reason"]
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /verify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 30000000\r\n\r\n{"
        )
        head = s.recv(65536).decode()
    assert head.startswith("HTTP/1.1 413") and '"is_valid": false' in head
    # a cross-site browser request is refused before the handler
    r = httpx.post(
        f"{url}/verify",
        json={},
        headers={"origin": "https://evil.example", "sec-fetch-site": "cross-site"},
    )
    assert r.status_code == 403


def test_verify_file_once(verifier, tmp_path, vectors):
    _, _, cfg = verifier
    req = tmp_path / "attest.json"
    req.write_text(json.dumps({"attestation": encode_v0(attestation()).hex()}))
    run = [sys.executable, "-m", "pydstack.verifier.main", "-c", cfg, "--verify"]
    assert subprocess.run([*run, str(req)], capture_output=True, timeout=60).returncode == 0
    assert json.loads((tmp_path / "attest.json.verification.json").read_text())["is_valid"]
    lite = vectors / "dstack/verifier_tdx-lite-attestation.json"
    copy = tmp_path / "lite.json"
    copy.write_bytes(lite.read_bytes())
    assert subprocess.run([*run, str(copy)], capture_output=True, timeout=60).returncode == 1


def test_a_mock_root_needs_the_insecure_flag(tmp_path):
    cfg = _config(tmp_path, insecure=False)
    p = subprocess.run(
        [sys.executable, "-m", "pydstack.verifier.main", "-c", cfg, "--verify", "/dev/null"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and "insecure_allow_external_trust_anchors" in p.stderr


def test_without_the_mock_root_simulated_quotes_fail(tmp_path):
    cfg = _config(tmp_path, root=False)
    req = tmp_path / "attest.json"
    req.write_text(json.dumps({"attestation": encode_v0(attestation()).hex()}))
    p = subprocess.run(
        [sys.executable, "-m", "pydstack.verifier.main", "-c", cfg, "--verify", str(req)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = json.loads((tmp_path / "attest.json.verification.json").read_text())
    assert p.returncode == 1 and not out["details"]["quote_verified"]
    assert out["details"]["event_log_verified"] and out["details"]["os_image_hash_verified"]


def test_dstack_verify_prints_a_summary(verifier, tmp_path):
    url, d, _ = verifier
    req = tmp_path / "attest.json"
    req.write_text(json.dumps({"attestation": encode_v0(attestation()).hex()}))
    cli = [sys.executable, "-m", "pydstack.vmm.cli", "verify"]
    remote = subprocess.run([*cli, str(req), "--verifier", url], capture_output=True, text=True)
    assert remote.returncode == 0, remote.stderr
    assert "valid:" in remote.stdout and "yes" in remote.stdout.splitlines()[0]
    local = subprocess.run(
        [
            *cli,
            "-",
            "--collateral",
            str(d / "collateral.json"),
            "--root-ca",
            str(d / "root.der"),
            "--image-cache",
            str(d / "images"),
        ],
        input=req.read_text(),
        capture_output=True,
        text=True,
    )
    assert local.returncode == 0, local.stderr
    assert local.stdout == remote.stdout  # the same result, the same summary
    bad = subprocess.run([*cli, "-"], input="{}", capture_output=True, text=True)
    assert bad.returncode == 1 and "refused: request: " in bad.stdout


def test_workers_share_the_port_and_stop_with_the_parent(tmp_path):
    """`workers = 3`: two more processes serve the parent's port; one that dies is started
    again, and all stop with the parent."""
    import os
    import signal
    import time

    def workers() -> list[int]:
        out = subprocess.run(
            ["pgrep", "-f", "pydstack.verifier.main --worker-port"], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]

    def wait_for(count: int) -> list[int]:
        for _ in range(200):
            if len(found := workers()) == count:
                return found
            time.sleep(0.05)
        return workers()

    cfg = Path(_config(tmp_path))
    cfg.write_text("workers = 3\n" + cfg.read_text())
    proc = subprocess.Popen(
        [sys.executable, "-m", "pydstack.verifier.main", "-c", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _wait(proc, "listening on")
        assert line.rstrip().endswith("(3 processes)")
        url = next(word for word in line.split() if word.startswith("http://"))
        first = wait_for(2)
        assert len(first) == 2
        body = {"attestation": encode_v0(attestation()).hex()}
        for _ in range(30):  # new connections, whichever process takes them
            r = httpx.post(f"{url}/verify", json=body, headers={"connection": "close"})
            assert r.status_code == 200 and r.json()["is_valid"]
        os.kill(first[0], signal.SIGKILL)
        for _ in range(200):  # restarted
            if first[0] not in (now := workers()) and len(now) == 2:
                break
            time.sleep(0.05)
        assert first[0] not in workers() and len(workers()) == 2
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    assert wait_for(0) == []
