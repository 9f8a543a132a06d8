"""the sandbox backend's one guest image, built in: its guest OS is pydstack itself. It ships
its expected measurement (`measurement.sandbox.json`), which `core.image.verify` checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydstack import __version__
from pydstack.mr.image import SANDBOX_MEASUREMENT, sandbox_measurement_doc
from pydstack.vmm.workdir import atomic_write

SANDBOX_IMAGE = "pydstack-sandbox"
#: the metadata `kind` of images this backend boots
IMAGE_KIND = "sandbox"


def sandbox_image_digest() -> str:
    """the os image hash of the built-in sandbox guest image (what a KMS allowlists)."""
    return hashlib.sha256(f"pydstack-sandbox {__version__}".encode()).hexdigest()


def ensure_sandbox_image(image_path: Path) -> None:
    """write (or refresh) the built-in image's directory under `image_path`."""
    d = image_path / SANDBOX_IMAGE
    meta = {"version": __version__, "is_dev": True, "kind": IMAGE_KIND, "shared_ro": True}
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
