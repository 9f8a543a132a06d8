"""guest images in `[image] path`: one directory each with `metadata.json` and `digest.txt`.

An image's `kind` in its metadata says which backend can boot it (`tdx` when it has none: an
image of upstream's layout, which the qemu backend boots); the VMM lists only the kinds its
backend boots (`Capabilities.image_kinds`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the kind of an image whose metadata names none (upstream's layout)
DEFAULT_KIND = "tdx"


@dataclass
class Image:
    name: str
    path: Path
    metadata: dict[str, Any]
    digest: str

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", ""))


def load_images(image_path: Path, kinds: Iterable[str]) -> dict[str, Image]:
    """the images in `image_path` whose metadata `kind` is one of `kinds` (unreadable or other
    images are skipped)."""
    wanted = frozenset(kinds)
    out: dict[str, Image] = {}
    if not image_path.is_dir():
        return out
    for d in sorted(image_path.iterdir()):
        try:
            meta = json.loads((d / "metadata.json").read_text())
            digest = (d / "digest.txt").read_text().strip()
            if not isinstance(meta, dict) or meta.get("kind", DEFAULT_KIND) not in wanted:
                continue  # an image another backend boots
            out[d.name] = Image(d.name, d, meta, digest)
        except (OSError, ValueError):
            continue
    return out


class ImageCatalog:
    """`load_images` answered from memory while the image directory is unchanged (its entries
    and each `metadata.json`/`digest.txt` by mtime): a Status of hundreds of VMs asks for an
    image per VM."""

    def __init__(self, image_path: Path, kinds: Iterable[str]) -> None:
        self.image_path = image_path
        self.kinds = tuple(kinds)
        self._key: tuple[tuple[str, int, int], ...] | None = None
        self._images: dict[str, Image] = {}

    def _signature(self) -> tuple[tuple[str, int, int], ...]:
        out = []
        try:
            entries = sorted(self.image_path.iterdir())
        except OSError:
            return ()
        for d in entries:
            stamps = []
            for name in ("metadata.json", "digest.txt"):
                try:
                    stamps.append((d / name).stat().st_mtime_ns)
                except OSError:
                    stamps.append(0)
            out.append((d.name, stamps[0], stamps[1]))
        return tuple(out)

    def get(self) -> dict[str, Image]:
        key = self._signature()
        if key != self._key:
            self._images = load_images(self.image_path, self.kinds)
            self._key = key
        return self._images
