"""a local Ethereum node for development and tests: anvil from the npm package
`@foundry-rs/anvil` (installed under contracts/node_modules by scripts/setup.sh)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[3]
DEFAULT_CHAIN_ID = 31337
#: anvil's first well-known development account (never use on a real chain)
DEV_PRIVATE_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"


def anvil_binary() -> Path:
    env = os.environ.get("ANVIL_BIN")
    if env:
        return Path(env)
    for p in sorted((REPO / "contracts/node_modules/@foundry-rs").glob("anvil-*/bin/anvil")):
        return p
    found = shutil.which("anvil")
    if found:
        return Path(found)
    raise FileNotFoundError(
        "anvil not found: run `npm ci` in contracts/ (package @foundry-rs/anvil) or set ANVIL_BIN"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Anvil:
    def __init__(self, chain_id: int = DEFAULT_CHAIN_ID, port: int | None = None) -> None:
        self.chain_id = chain_id
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Anvil:
        self.proc = subprocess.Popen(
            [
                str(anvil_binary()),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--chain-id",
                str(self.chain_id),
                "--silent",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"anvil exited: {err[:500]}")
            try:
                r = httpx.post(
                    self.url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId"}, timeout=1
                )
                if int(r.json()["result"], 16) == self.chain_id:
                    return self
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("anvil did not answer in time")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
