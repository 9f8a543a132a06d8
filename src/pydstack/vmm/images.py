"""guest images in `[image] path`: one directory each with `metadata.json` and `digest.txt`
(the sandbox image also ships its expected measurement, `measurement.sandbox.json`).

The sandbox backend boots only its built-in image (the guest OS is pydstack itself); QEMU
images in the same directory are listed by upstream tools but skipped here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydstack import __version__
from pydstack.mr.image import SANDBOX_MEASUREMENT, sandbox_measurement_doc

from .workdir import atomic_write

SANDBOX_IMAGE = "pydstack-sandbox"


@dataclass
class Image:
    name: str
    path: Path
    metadata: dict[str, Any]
    digest: str

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", ""))


def sandbox_image_digest() -> str:
    """the os image hash of the built-in sandbox guest image (what a KMS allowlists)."""
    return hashlib.sha256(f"pydstack-sandbox {__version__}".encode()).hexdigest()


def ensure_sandbox_image(image_path: Path) -> None:
    """the built-in guest image of the sandbox backend (the guest OS is pydstack itself)."""
    d = image_path / SANDBOX_IMAGE
    meta = {"version": __version__, "is_dev": True, "kind": "sandbox", "shared_ro": True}
    digest = sandbox_image_digest()
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "metadata.json").exists() or json.loads((d / "metadata.json").read_text()) != meta:
        atomic_write(d / "metadata.json", json.dumps(meta, indent=2).encode())
        atomic_write(d / "digest.txt", digest.encode())
    # the expected MRTD/RTMR0-2 of a CVM booted from this image (`core.image.verify` reads it)
    measurement = sandbox_measurement_doc(digest)
    path = d / SANDBOX_MEASUREMENT
    if not path.exists() or path.read_bytes() != measurement:
        atomic_write(path, measurement)


def load_images(image_path: Path) -> dict[str, Image]:
    out: dict[str, Image] = {}
    if not image_path.is_dir():
        return out
    for d in sorted(image_path.iterdir()):
        try:
            meta = json.loads((d / "metadata.json").read_text())
            digest = (d / "digest.txt").read_text().strip()
            if not isinstance(meta, dict) or meta.get("kind") != "sandbox":
                continue  # a QEMU guest image: this backend cannot boot it
            out[d.name] = Image(d.name, d, meta, digest)
        except (OSError, ValueError):
            continue
    return out
