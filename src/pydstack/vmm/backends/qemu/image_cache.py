"""the guest image a dev stack, the main job and the tests boot: built once per source version
(:mod:`.image_build`) into `.cache/guest-image/images/`, reused by every later run.

The cache key is the flavour, the Debian package list and a hash of the pydstack sources that go
into the image, so a changed guest gets a new image and an unchanged one is never rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .image_build import DEFAULT_EPOCH, PACKAGES, build, checkout_root, default_cache

#: the image's name in a VMM's image directory
IMAGE_NAMES = {"dev": "pydstack-qemu-dev", "prod": "pydstack-qemu-prod"}


def source_key(flavour: str) -> str:
    """what the image is built from: the flavour, the packages and pydstack's sources."""
    root = checkout_root()
    h = hashlib.sha256(f"{flavour} {' '.join(PACKAGES)}".encode())
    files = sorted((root / "src" / "pydstack").rglob("*"))
    for path in [root / "pyproject.toml", *files]:
        if path.is_file() and "__pycache__" not in path.parts and not path.name.endswith(".pyc"):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def cached_image(
    flavour: str = "dev", say: Callable[[str], None] = print, cache: Path | None = None
) -> Path:
    """the image directory of this source version, built if it is not cached yet."""
    cache = cache or default_cache()
    images = cache / "images"
    out = images / f"{IMAGE_NAMES[flavour]}-{source_key(flavour)}"
    if out.is_dir():
        return out
    images.mkdir(parents=True, exist_ok=True)
    for old in images.glob(f"{IMAGE_NAMES[flavour]}-*"):  # earlier source versions
        shutil.rmtree(old, ignore_errors=True)
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_EPOCH))
    build(out, flavour, cache, epoch, say)
    return out


def install_image(image_dir: Path, image_path: Path, flavour: str = "dev") -> str:
    """make `image_dir` available in a VMM's `image_path` under its flavour's name (a symlink);
    returns that name."""
    name = IMAGE_NAMES[flavour]
    link = image_path / name
    image_path.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.is_symlink() and link.resolve() == image_dir.resolve():
            return name
        if link.is_symlink():
            link.unlink()
        else:
            shutil.rmtree(link)
    link.symlink_to(image_dir.resolve())
    return name
