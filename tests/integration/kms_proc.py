"""start dstack-kms (and the mock pccs it fetches collateral from) as real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pydstack.devstack import free_port
from pydstack.tee.simulated import SimulatedTdx

SEED = bytes.fromhex("a1" * 32)
OS_IMAGE = "pydstack-sim"


def _wait(proc: subprocess.Popen[str], marker: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if marker in line:
            return line
    err = proc.stderr.read() if proc.stderr else ""
    raise RuntimeError(f"process exited before printing {marker!r}: {err[-2000:]}")


@dataclass
class KmsProc:
    proc: subprocess.Popen[str]
    url: str
    dir: Path
    config: Path

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=10)


class Pccs:
    def __init__(self, root_out: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pydstack.tee.collateral_server",
                "--seed",
                SEED.hex(),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--root-out",
                str(root_out),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        _wait(self.proc, "serving")
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=10)


def write_config(
    directory: Path,
    pccs_url: str,
    root: Path,
    allowlist: Path,
    *,
    agent: Path | None = None,
    source_url: str = "",
    address: str = "127.0.0.1",
    image_cache: Path | None = None,
) -> Path:
    """a kms.toml; with `agent` the kms attests itself (self-authorization, attested rpc cert);
    with `image_cache` it verifies os images from that directory."""
    image = f'verify = true\ncache_dir = "{image_cache}"' if image_cache else "verify = false"
    port = free_port()
    attested = "true" if agent else "false"
    extra = f'guest_agent = "{agent}"' if agent else ""
    onboard = f'source_url = "{source_url}"' if source_url else ""
    cfg = directory / "kms.toml"
    cfg.write_text(f"""
[rpc]
address = "{address}"
port = {port}

[core]
cert_dir = "{directory / "certs"}"
enforce_self_authorization = {attested}
attest_rpc_cert = {attested}
{extra}

[core.image]
{image}

[core.onboard]
auto_bootstrap_domain = "kms.local"
{onboard}

[core.attestation]
insecure_allow_external_trust_anchors = true
cache_dir = "{directory / "collateral"}"

[core.attestation.urls]
pccs = "{pccs_url}"

[core.attestation.root_ca]
tdx = "{root}"

[core.auth_api]
type = "simple"

[core.auth_api.simple]
config = "{allowlist}"
""")
    return cfg


def start_kms(config: Path) -> KmsProc:
    # the log goes to a file: a pipe nobody reads fills up under load (the dev auth backend
    # logs every grant) and the KMS then blocks on its next log line
    log = config.parent / "kms.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pydstack.kms.main", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        line = _wait(proc, "listening on")
    except RuntimeError as e:
        raise RuntimeError(f"{e}{log.read_text()[-2000:]}") from None
    return KmsProc(proc, line.split()[-1], config.parent, config)


def allowlist(path: Path, *, apps: dict, os_images: list[str], **kw: object) -> None:
    path.write_text(
        json.dumps(
            {
                "gatewayAppId": "gw-test",
                "osImages": os_images,
                "allowedTcbStatuses": ["UpToDate"],
                "kms": {"mrAggregated": [], "allowAnyDevice": True},
                "apps": apps,
                **kw,
            }
        )
    )


def sim_td() -> SimulatedTdx:
    return SimulatedTdx(SEED, os_image=OS_IMAGE)
