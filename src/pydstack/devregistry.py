"""a local image registry for dev stacks and tests: Debian's `docker-registry` (CNCF
distribution 2.8) as a process, its storage in a directory of ours.

It speaks plain http (no TLS) and has no auth: bind it only to addresses this host controls.
A dev stack runs two over one storage directory: a writable one on loopback, where the host
pushes, and a read-only one on the CVM bridge, where CVMs pull (a CVM must not be able to
replace the images other CVMs pull).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx

from pydstack.errors import DstackError

BINARY = "docker-registry"


class RegistryStartError(DstackError):
    """the registry is not installed or did not come up."""


def config_yaml(storage: Path, listen: str, readonly: bool = False) -> str:
    return f"""version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: {str(not readonly).lower()}
  maintenance:
    readonly:
      enabled: {str(readonly).lower()}
http:
  addr: {listen}
  headers:
    X-Content-Type-Options: [nosniff]
"""


def start(
    directory: Path, listen: str, log: Path, *, readonly: bool = False, timeout: float = 30
) -> subprocess.Popen[bytes]:
    """start a registry on `listen` (`host:port`) with its storage (`directory/storage`) and
    config under `directory`, refusing every write when `readonly`, and wait until `/v2/`
    answers. RegistryStartError when it is not installed
    (apt-get install docker-registry) or does not answer in `timeout` seconds."""
    exe = shutil.which(BINARY) or shutil.which(BINARY, path="/usr/bin")
    if exe is None:
        raise RegistryStartError(
            "docker-registry is not installed (apt-get install docker-registry)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    cfg = directory / ("registry-ro.yml" if readonly else "registry.yml")
    cfg.write_text(config_yaml(directory / "storage", listen, readonly))
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [exe, "serve", str(cfg)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"http://{listen}/v2/", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            tail = log.read_bytes()[-1000:].decode(errors="replace")
            raise RegistryStartError(f"docker-registry did not start on {listen}: {tail}")
        time.sleep(0.1)
