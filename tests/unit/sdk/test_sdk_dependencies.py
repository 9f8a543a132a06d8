"""an app that only uses the SDK installs `pydstack` without extras: the SDK must not import
the stack's dependencies (web3, aiohttp, protobuf, dcap-qvl, yaml, msgpack)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"
STACK_ONLY = ("web3", "eth_account", "aiohttp", "google.protobuf", "dcap_qvl", "yaml", "msgpack")

PROBE = f"""
import importlib.abc, sys
blocked = {STACK_ONLY!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in blocked):
            raise ImportError("blocked for this test: " + name)
sys.meta_path.insert(0, Block())
from pydstack.sdk import AsyncDstackClient, DstackClient, TappdClient
from pydstack.sdk import env
print("ok")
"""


def test_the_sdk_imports_without_the_stack():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_base_install_holds_no_stack_dependency():
    project = tomllib.loads(PROJECT.read_text())["project"]
    base = " ".join(project["dependencies"])
    for dep in ("web3", "eth-account", "aiohttp", "protobuf", "dcap-qvl", "pyyaml", "msgpack"):
        assert dep not in base, dep
    assert "version" in project["dynamic"]  # one source: pydstack.__version__
