"""start `dstack-simulator` as a real process for tests."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Simulator:
    proc: subprocess.Popen[str]
    dir: Path
    dstack_sock: Path
    tappd_sock: Path
    http: str
    external: str

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate(timeout=5)


def start_simulator(
    directory: Path, seed: str | None = None, extra_args: tuple[str, ...] = ()
) -> Simulator:
    cmd = [
        sys.executable,
        "-m",
        "pydstack.guest.simulator",
        "--dir",
        str(directory),
        "--http",
        "127.0.0.1:0",
        "--external",
        "127.0.0.1:0",
    ]
    if seed:
        cmd += ["--seed", seed]
    cmd += extra_args
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    endpoints: dict[str, str] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("dstack", "tappd", "http", "external"):
            endpoints[parts[0]] = parts[1]
        if line.startswith("export TAPPD_SIMULATOR_ENDPOINT"):
            break
    else:
        err = proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"simulator did not start: {err}")
    return Simulator(
        proc,
        directory,
        Path(endpoints["dstack"]),
        Path(endpoints["tappd"]),
        endpoints["http"],
        endpoints["external"],
    )
