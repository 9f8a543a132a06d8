"""a local stack for VMM tests: mock PCCS, KMS (reachable from the CVM bridge) and dstack-vmm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pydstack.vmm.app import sandbox_image_digest

from . import kms_proc

BRIDGE_HOST = "10.213.0.1"


def vmm_toml(
    directory: Path, port: int, kms_url: str, *, auth_token: str = "", **cvm: object
) -> Path:
    auth = f'[auth]\nenabled = true\ntokens = ["{auth_token}"]\n' if auth_token else ""
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in cvm.items())
    cfg = directory / "vmm.toml"
    cfg.write_text(f"""
address = "tcp:127.0.0.1:{port}"
kms_url = "{kms_url}"
run_path = "{directory / "run" / "vm"}"

[image]
path = "{directory / "images"}"

[cvm]
kms_urls = ["{kms_url.replace("127.0.0.1", BRIDGE_HOST)}"]
gateway_urls = []
{extra}
[cvm.port_mapping]
enabled = true
address = "127.0.0.1"
range = [{{ protocol = "tcp", from = 1024, to = 65535 }}]

[cvm.auto_restart]
enabled = false

[cvm.tee_simulator]
mock_attestation_seed = "{kms_proc.SEED.hex()}"

[cvm.sandbox]
scrypt_n = 10
{auth}""")
    return cfg


@dataclass
class Vmm:
    config: Path
    url: str
    proc: subprocess.Popen[str] | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        log = open(self.config.parent / "vmm.log", "a")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pydstack.vmm.main", "-c", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"dstack-vmm exited: {(self.config.parent / 'vmm.log').read_text()[-3000:]}"
                )
            try:
                httpx.get(f"{self.url}/prpc/Version", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("dstack-vmm did not come up")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def rpc(self, method: str, body: dict[str, object] | None = None) -> dict[str, object]:
        r = httpx.post(f"{self.url}/prpc/{method}?json", json=body or {}, timeout=30)
        if r.status_code != 200:
            raise RuntimeError(f"{method}: {r.status_code} {r.text}")
        out = r.json()
        assert isinstance(out, dict)
        return out

    def cli(self, *args: str, check: bool = True, input: str | None = None) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "pydstack.vmm.cli", "--url", self.url, *args],
            capture_output=True,
            text=True,
            input=input,
            env={**os.environ, "HOME": str(self.config.parent), **self.env},
            timeout=120,
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"dstack {' '.join(args)} failed: {out.stderr}{out.stdout}")
        return out.stdout + out.stderr

    def info(self, vm_id: str) -> dict[str, object]:
        return self.rpc("GetInfo", {"id": vm_id})["info"]  # type: ignore[return-value]

    def wait(self, vm_id: str, pred: object, timeout: float = 120) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        info: dict[str, object] = {}
        while time.monotonic() < deadline:
            info = self.info(vm_id)
            if pred(info):  # type: ignore[operator]
                return info
            time.sleep(0.3)
        log = httpx.get(f"{self.url}/logs?id={vm_id}&follow=false&ansi=false&lines=80").text
        raise AssertionError(f"vm {vm_id} never reached the state: {info}\n{log}")


@dataclass
class Stack:
    dir: Path
    pccs: kms_proc.Pccs
    kms: kms_proc.KmsProc
    vmm: Vmm
    allowlist: Path
    kms_url: str

    def allow(self, apps: dict[str, list[str]]) -> None:
        """let these app ids boot with these compose hashes (hex)."""
        kms_proc.allowlist(
            self.allowlist,
            apps={a: {"composeHashes": h, "allowAnyDevice": True} for a, h in apps.items()},
            os_images=[sandbox_image_digest()],
        )

    def close(self) -> None:
        try:
            for vm in self.vmm.rpc("Status", {})["vms"] if self.vmm.proc else []:  # type: ignore[union-attr]
                self.vmm.rpc("RemoveVm", {"id": vm["id"]})  # type: ignore[index]
        except Exception:
            pass
        self.vmm.stop()
        self.kms.stop()
        self.pccs.stop()


def start_stack(directory: Path, **cvm: object) -> Stack:
    directory.mkdir(parents=True, exist_ok=True)
    pccs = kms_proc.Pccs(directory / "root.der")
    allow = directory / "allow.json"
    kms_proc.allowlist(allow, apps={}, os_images=[sandbox_image_digest()])
    cfg = kms_proc.write_config(
        directory, pccs.url, directory / "root.der", allow, address="0.0.0.0"
    )
    kms = kms_proc.start_kms(cfg)
    kms_url = kms.url.replace("0.0.0.0", "127.0.0.1")
    port = kms_proc.free_port()
    vmm = Vmm(vmm_toml(directory, port, kms_url, **cvm), f"http://127.0.0.1:{port}")
    vmm.start()
    return Stack(directory, pccs, kms, vmm, allow, kms_url)
