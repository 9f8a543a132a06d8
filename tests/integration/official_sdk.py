"""fetch upstream's official SDKs from their registries at test time (nothing committed).

* Python: the `dstack-sdk==0.5.4` sdist from PyPI, unpacked, installed into its own venv with
  its test dependencies; its `tests/` directory is run against an endpoint.
* JavaScript: `@phala/dstack-sdk` from npm, installed into a cache directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("PYDSTACK_TEST_CACHE", REPO / ".cache"))
PY_SDK_VERSION = "0.5.4"
PY_TEST_DEPS = ["pytest", "pytest-asyncio", "evidence-api", "eth-account", "solders"]
JS_SDK = ["@phala/dstack-sdk@0.5.8", "@noble/curves@1", "@noble/hashes@1"]


def _run(cmd: list[str], **kw: object) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=900, **kw)  # type: ignore[call-overload]


def python_sdk() -> tuple[Path, Path]:
    """(python of a venv with the official sdk installed, its unpacked tests dir)."""
    root = CACHE / f"official-python-sdk-{PY_SDK_VERSION}"
    py = root / "venv/bin/python"
    tests = root / f"dstack_sdk-{PY_SDK_VERSION}/tests"
    stamp = root / ".ready"
    if stamp.exists() and py.exists() and tests.is_dir():
        return py, tests
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(root),
            f"dstack-sdk=={PY_SDK_VERSION}",
        ]
    )
    sdist = next(root.glob("dstack_sdk-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(root, filter="data")
    _run([sys.executable, "-m", "venv", str(root / "venv")])
    _run([str(py), "-m", "pip", "install", "-q", str(sdist), *PY_TEST_DEPS])
    stamp.touch()
    return py, tests


def run_python_suite(
    dstack_endpoint: str, tappd_endpoint: str, workdir: Path
) -> subprocess.CompletedProcess[str]:
    py, tests = python_sdk()
    target = workdir / "official-tests"
    shutil.copytree(tests, target, dirs_exist_ok=True)
    env = {
        **os.environ,
        "DSTACK_SIMULATOR_ENDPOINT": dstack_endpoint,
        "TAPPD_SIMULATOR_ENDPOINT": tappd_endpoint,
    }
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(py), "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(target)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=workdir,
    )


def js_sdk() -> Path:
    """a directory whose node_modules holds the official JS SDK."""
    root = CACHE / "official-js-sdk"
    if (root / "node_modules/@phala/dstack-sdk/package.json").exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    (root / "package.json").write_text('{"name": "pydstack-js-sdk-check", "private": true}\n')
    _run(["npm", "install", "--no-audit", "--no-fund", "--silent", *JS_SDK], cwd=root)
    return root
