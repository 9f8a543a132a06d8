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
import contextlib
import hashlib
import importlib.util
import json
import modulefinder
import os
import pkgutil
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


def stdlib_closure(scripts: dict[str, bytes]) -> set[Path]:
    """the standard-library files `scripts` can import: modulefinder's static closure (every
    import statement, also those inside functions and branches), with every codec (looked up by
    name at run time) and what the interpreter imports at start-up."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    dynload = stdlib / "lib-dynload"
    finder = modulefinder.ModuleFinder(path=[str(stdlib), str(dynload)], excludes=_NOT_FOR_APPS)
    with tempfile.TemporaryDirectory(prefix="pydstack-closure-") as tmp:
        for i, data in enumerate(scripts.values()):
            script = Path(tmp) / f"script{i}.py"
            script.write_bytes(data)
            finder.run_script(str(script))
    codecs = [f"encodings.{m.name}" for m in pkgutil.iter_modules([str(stdlib / "encodings")])]
    for name in ("site", "encodings", *codecs, *_STARTUP):
        with contextlib.suppress(ImportError, SyntaxError):
            finder.import_hook(name)
    out: set[Path] = set()
    for module in finder.modules.values():
        file = getattr(module, "__file__", None)
        if not file:
            continue
        path = Path(file)
        if not path.is_relative_to(stdlib):
            continue
        out.add(path)
        if path.suffix == ".py":
            cached = Path(importlib.util.cache_from_source(str(path)))
            if cached.exists():
                out.add(cached)
    return out


#: what a service never imports, though some import statement somewhere names it (GUI, tests,
#: debuggers and documentation browsers, build tools); left out of the closure and not followed
_NOT_FOR_APPS = ["tkinter", "_tkinter", "turtle", "turtledemo", "idlelib", "test", "unittest",
                 "lib2to3", "pydoc", "pydoc_data", "doctest", "pdb", "ensurepip", "distutils",
                 "curses", "_curses", "_curses_panel", "sqlite3", "_sqlite3", "dbm", "readline",
                 "_testcapi", "_testinternalcapi", "_testbuffer", "_testimportmultiple",
                 "_testmultiphase", "_xxtestfuzz", "xxlimited", "xxsubtype"]  # fmt: skip
#: modules a plain `python3 script.py` imports before the script (frozen ones need no file,
#: but the interpreter finds its prefix by os.py)
_STARTUP = ("os", "stat", "posixpath", "genericpath", "io", "abc", "codecs", "_collections_abc",
            "_sitebuiltins", "warnings", "linecache", "tokenize", "traceback")  # fmt: skip


def _copy_python(root: Path, scripts: dict[str, bytes]) -> None:
    """the host's interpreter with the standard library `scripts` can import, the extension
    modules among it and the shared libraries they link, debug symbols stripped: every byte
    here is pulled and unpacked by every CVM boot."""
    exe = Path(sys.executable).resolve()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    _copy(exe, root)
    (root / "bin/python3").unlink(missing_ok=True)
    (root / "bin/python3").symlink_to(str(exe))
    (root / (stdlib / "lib-dynload").relative_to("/")).mkdir(parents=True, exist_ok=True)
    libs = _libs(exe)
    for path in stdlib_closure(scripts):
        _copy(path, root)
        if path.suffix == ".so":
            libs |= _libs(path)
    for lib in libs:
        _copy(lib, root)  # at the name the loader asks for, with the target's bytes
    strip = shutil.which("strip")
    if strip is None:
        return
    elf = [root / p.relative_to("/") for p in (exe, *libs)]
    elf += [p for p in root.rglob("*.so") if p.is_file()]
    subprocess.run([strip, "--strip-unneeded", *map(str, elf)], capture_output=True)


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
        scripts = {rel: data for rel, data in files.items() if rel.endswith(".py")}
        _copy_python(root, scripts)
    for rel, data in files.items():
        dst = root / rel.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)


def digest_of(files: dict[str, bytes], python: bool, cmd: list[str]) -> str:
    h = hashlib.sha256()
    h.update(f"v3 python={python} {sys.version} cmd={cmd!r}".encode())
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
