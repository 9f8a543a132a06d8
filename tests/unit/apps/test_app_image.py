"""the sample app's image carries the part of the standard library its code can import."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pydstack.apps.image import build_rootfs, stdlib_closure

HELLO = (Path(__file__).parents[3] / "src/pydstack/apps/hello.py").read_bytes()


def _names(paths: set[Path]) -> set[str]:
    return {p.name for p in paths} | {f"{p.parent.name}/{p.name}" for p in paths}


def test_the_closure_follows_imports_codecs_and_leaves_out_tools() -> None:
    names = _names(stdlib_closure({"/app/hello.py": HELLO}))
    # what hello imports, also through others (http.server -> email), and their extensions
    for wanted in ("ssl.py", "server.py", "email/parser.py", "tempfile.py", "threading.py"):
        assert wanted in names, wanted
    assert any(n.startswith("_ssl.") and n.endswith(".so") for n in names)
    # codecs are looked up by name at run time; the interpreter finds its prefix by os.py
    assert {"encodings/idna.py", "encodings/utf_8.py", "os.py"} <= names
    for unwanted in ("tkinter/__init__.py", "unittest/__init__.py", "pydoc.py"):
        assert unwanted not in names, unwanted
    assert not any(n.startswith("_tkinter.") for n in names)


def test_a_script_importing_more_gets_more() -> None:
    """the closure is the script's: a module hello never names is in only when asked for."""
    assert "wave.py" not in _names(stdlib_closure({"/app/hello.py": HELLO}))
    assert "wave.py" in _names(stdlib_closure({"/app/a.py": b"import wave\n"}))


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("chroot") is None, reason="needs root")
def test_the_image_runs_what_hello_imports(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    build_rootfs(root, {"/app/hello.py": HELLO}, python=True)
    code = (
        "import ast, sys; tree = ast.parse(open('/app/hello.py').read()); "
        "names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]"
        " + [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module "
        "and n.level == 0]; [__import__(m) for m in names]; 'x'.encode('idna'); "
        "import ssl; ssl.create_default_context(); print('ok', len(names))"
    )
    out = subprocess.run(
        ["chroot", str(root), "/bin/python3", "-c", code], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok ")
