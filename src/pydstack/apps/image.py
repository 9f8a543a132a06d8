"""build container images locally from host files, for sample apps and tests.

No registry outside this host is reachable, so images are assembled from what the host has:
busybox (static) for a shell and tools, and the host's Python interpreter with its standard
library and the shared libraries they link. `podman import` turns the root filesystem into an
image in the host's store; :func:`push_image` publishes it once to the stack's local registry,
from which sandbox CVMs pull it. The tag carries a digest of the inputs, so an unchanged image
is neither rebuilt nor pushed again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import httpx

from pydstack.errors import DstackError

BUSYBOX = Path("/bin/busybox")
MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_LDD = re.compile(r"(/\S+\.so[^\s]*)")


class ImageError(DstackError):
    """an image cannot be built."""


def _libs(binary: Path) -> set[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if out.returncode != 0:
        return set()
    return {Path(m) for m in _LDD.findall(out.stdout)}


def _copy(src: Path, root: Path) -> None:
    dst = root / src.relative_to("/")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src.resolve(), dst)


def build_rootfs(root: Path, files: dict[str, bytes], *, python: bool) -> None:
    if not BUSYBOX.exists():
        raise ImageError("busybox is missing (apt-get install busybox-static)")
    for d in ("bin", "etc", "tmp", "app", "var/run", "root", "proc", "sys", "dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for a in applets:
        link = root / "bin" / a
        if not link.exists():
            link.symlink_to("busybox")
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n"
    )
    (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    if python:
        exe = Path(sys.executable).resolve()
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        dynload = stdlib / "lib-dynload"
        _copy(exe, root)
        (root / "bin/python3").unlink(missing_ok=True)
        (root / "bin/python3").symlink_to(str(exe))
        skip = {
            "test",
            "idlelib",
            "tkinter",
            "turtledemo",
            "ensurepip",
            "site-packages",
            "dist-packages",
            "lib2to3",
            "pydoc_data",
            "unittest",
            "distutils",
            "__phello__",
        }
        # what an app never needs at run time: every byte here is pulled by every cvm boot
        # (the static libpython under config-*/ alone is tens of MiB)
        shutil.copytree(
            stdlib,
            root / stdlib.relative_to("/"),
            symlinks=True,
            ignore=lambda d, names: [
                n
                for n in names
                if n in skip or n.startswith("config-") or n.endswith((".opt-1.pyc", ".opt-2.pyc"))
            ],
            dirs_exist_ok=True,
        )
        libs = _libs(exe)
        for so in dynload.glob("*.so"):
            libs |= _libs(so)
        for lib in libs:
            _copy(lib, root)  # at the name the loader asks for, with the target's bytes
    for rel, data in files.items():
        dst = root / rel.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)


def digest_of(files: dict[str, bytes], python: bool, cmd: list[str]) -> str:
    h = hashlib.sha256()
    h.update(f"v2 python={python} {sys.version} cmd={cmd!r}".encode())
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
    return h.hexdigest()[:12]


def image_exists(tag: str) -> bool:
    return subprocess.run(["podman", "image", "exists", tag]).returncode == 0


def build_image(
    name: str,
    files: dict[str, bytes],
    *,
    python: bool = True,
    cmd: list[str] | None = None,
    workdir: str = "/app",
) -> str:
    """build (or reuse) `localhost/<name>:<digest>`; returns the tag."""
    if shutil.which("podman") is None:
        raise ImageError("podman is missing (apt-get install podman)")
    cmd = cmd or ["/bin/sh"]
    tag = f"localhost/{name}:{digest_of(files, python, cmd)}"
    if image_exists(tag):
        return tag
    with tempfile.TemporaryDirectory(prefix="pydstack-image-") as tmp:
        root = Path(tmp) / "rootfs"
        build_rootfs(root, files, python=python)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        changes = [
            "--change",
            f"CMD {json.dumps(cmd)}",
            "--change",
            f"WORKDIR {workdir}",
            "--change",
            "ENV PATH=/bin:/usr/bin",
        ]
        out = subprocess.run(
            ["podman", "import", *changes, "-", tag],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
        )
        tar.wait()
        if out.returncode != 0 or tar.returncode != 0:
            raise ImageError(f"podman import failed: {out.stderr.strip()[-500:]}")
    return tag


def push_image(local: str, registry: str) -> str:
    """push `localhost/<name>:<tag>` to `registry` (`host:port`, plain http) as
    `library/<name>:<tag>`, unless it is there already; returns `<name>:<tag>`, the short name
    a compose uses (CVMs resolve it through their docker.io mirror, that registry)."""
    name = local.rsplit("/", 1)[-1]
    repo, _, tag = name.partition(":")
    try:
        r = httpx.head(
            f"http://{registry}/v2/library/{repo}/manifests/{tag}",
            headers={"Accept": ", ".join(MANIFEST_TYPES)},
            timeout=10,
        )
        if r.status_code == 200:
            return name
    except httpx.HTTPError as e:
        raise ImageError(f"cannot reach the registry {registry}: {e}") from e
    out = subprocess.run(
        # zstd layers: a cvm without kvm (qemu under tcg) unpacks them several times faster
        ["podman", "push", "--quiet", "--tls-verify=false", "--compression-format=zstd", local,
         f"docker://{registry}/library/{name}"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    if out.returncode != 0:
        raise ImageError(f"podman push to {registry} failed: {out.stderr.strip()[-500:]}")
    return name


def hello_image() -> str:
    """the sample app's image (`pydstack.apps.hello` on the host's Python)."""
    src = (Path(__file__).parent / "hello.py").read_bytes()
    return build_image("pydstack-hello", {"/app/hello.py": src}, cmd=["python3", "/app/hello.py"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pydstack.apps.image", description="build the sample app's image locally"
    )
    ap.parse_args(argv)
    try:
        print(hello_image())
    except ImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
