"""OS images by `os_image_hash`: a cache directory, downloads, and cached measurements.

Layout of the cache directory (upstream's KMS and verifier use the first two):

* `images/<os_image_hash hex>/` — an image directory (downloaded ones land here);
* `measurements/<key>.json` — computed measurements, by image and VM configuration;
* any other subdirectory holding an image (a VMM's `[image] path` can be the cache directory
  itself): found by its identity, whatever its name.

A missing image is downloaded from the URL template (`{OS_IMAGE_HASH}` replaced by the hex hash),
a `.tar.gz` of the image's files: regular files with plain names only (at most 64, each within
the download limit), `sha256sum.txt` whose sha256 is the hash asked for and whose every line
matches its file; files it does not list are dropped. One download per image at a time, however
many callers wait for it; a failed one is not remembered.

Measurements are computed in a worker thread (hashing firmware, kernel and initrd), kept in
memory (bounded) and on disk; a corrupt disk entry is ignored and rewritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections import OrderedDict
from pathlib import Path

import aiohttp

from pydstack.attest.errors import ParseError, VerifyError

from .image import ImageDir, ImageError, PartialMeasurements
from .lite import CHECKSUM_FILE, checksum_entry
from .machine import VmMeasureConfig

log = logging.getLogger(__name__)

HASH_PLACEHOLDER = "{OS_IMAGE_HASH}"
MAX_DOWNLOAD = 2 * 1024 * 1024 * 1024
MAX_MEMBERS = 64
MEMORY_ENTRIES = 256
CACHE_VERSION = 1


def _hex(os_image_hash: bytes) -> str:
    if len(os_image_hash) != 32:
        raise VerifyError(f"os_image_hash must be 32 bytes, got {len(os_image_hash)}")
    return os_image_hash.hex()


class ImageStore:
    def __init__(
        self,
        cache_dir: Path,
        download_url: str = "",
        download_timeout: float = 300.0,
        max_download: int = MAX_DOWNLOAD,
    ) -> None:
        if download_url and HASH_PLACEHOLDER not in download_url:
            raise ValueError(f"image download url must contain {HASH_PLACEHOLDER}")
        self.cache_dir = cache_dir
        self.download_url = download_url
        self.download_timeout = download_timeout
        self.max_download = max_download
        self._flights: dict[str, asyncio.Future[ImageDir]] = {}
        self._memory: OrderedDict[str, PartialMeasurements] = OrderedDict()
        self.computed = 0

    # ------------------------------------------------------------------ lookup
    def find(self, os_image_hash: bytes) -> ImageDir | None:
        """the cached image with this identity, or None."""
        hex_hash = _hex(os_image_hash)
        direct = self.cache_dir / "images" / hex_hash
        candidates = [direct] if direct.is_dir() else []
        with contextlib.suppress(OSError):
            candidates += [
                d
                for d in sorted(self.cache_dir.iterdir())
                if d.is_dir() and d.name not in ("images", "measurements")
            ]
        for d in candidates:
            if not (d / "metadata.json").is_file():
                continue
            try:
                image = ImageDir.open(d)
            except VerifyError as e:
                if d == direct:
                    raise
                log.debug("skipping %s: %s", d, e)
                continue
            if image.identity == os_image_hash:
                return image
            if d == direct:
                raise ImageError(f"cached image {hex_hash} has another identity")
        return None

    async def get(self, os_image_hash: bytes) -> ImageDir:
        """the image with this identity, downloaded when missing; VerifyError when it cannot be
        had."""
        found = self.find(os_image_hash)
        if found is not None:
            return found
        hex_hash = _hex(os_image_hash)
        if not self.download_url:
            raise VerifyError(f"os image {hex_hash} is not in the image cache")
        flight = self._flights.get(hex_hash)
        if flight is None:
            flight = asyncio.ensure_future(self._download(os_image_hash))
            self._flights[hex_hash] = flight
            flight.add_done_callback(lambda f: self._flights.pop(hex_hash, None))
        return await asyncio.shield(flight)

    # ------------------------------------------------------------------ download
    async def _download(self, os_image_hash: bytes) -> ImageDir:
        hex_hash = os_image_hash.hex()
        url = self.download_url.replace(HASH_PLACEHOLDER, hex_hash)
        images = self.cache_dir / "images"
        images.mkdir(parents=True, exist_ok=True)
        log.info("downloading os image %s from %s", hex_hash, url)
        with tempfile.TemporaryDirectory(dir=images, prefix=".download-") as tmp:
            archive = Path(tmp) / "image.tar.gz"
            try:
                await asyncio.wait_for(self._fetch(url, archive), self.download_timeout)
            except TimeoutError as e:
                raise VerifyError(f"download of os image {hex_hash} timed out") from e
            except (aiohttp.ClientError, OSError) as e:
                log.warning("download of os image %s failed: %s", hex_hash, e)
                raise VerifyError(f"cannot download os image {hex_hash}") from e
            target = images / hex_hash
            await asyncio.to_thread(self._unpack, archive, Path(tmp) / "image", os_image_hash)
            if not target.exists():
                os.rename(Path(tmp) / "image", target)
        image = self.find(os_image_hash)
        if image is None:  # pragma: no cover - just renamed into place
            raise VerifyError(f"os image {hex_hash} vanished after its download")
        return image

    async def _fetch(self, url: str, out: Path) -> None:
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            if resp.status != 200:
                raise VerifyError(f"image download answered http {resp.status}")
            size = 0
            with open(out, "wb") as f:
                async for chunk in resp.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > self.max_download:
                        raise VerifyError(f"image download exceeds {self.max_download} bytes")
                    f.write(chunk)

    def _unpack(self, archive: Path, dest: Path, os_image_hash: bytes) -> None:
        dest.mkdir()
        try:
            with tarfile.open(archive, "r:*") as tar:
                names: set[str] = set()
                for count, member in enumerate(tar, 1):
                    if count > MAX_MEMBERS:
                        raise VerifyError(f"image archive has more than {MAX_MEMBERS} members")
                    name = member.name.removeprefix("./")
                    if member.isdir() and name in ("", "."):
                        continue
                    if not member.isreg() or not name or "/" in name or name == "..":
                        raise VerifyError(
                            f"image archive member {member.name[:64]!r} is not a plain file"
                        )
                    if name in names:
                        raise VerifyError(f"image archive has {name[:64]!r} twice")
                    if member.size > self.max_download:
                        raise VerifyError(f"image archive member {name[:64]!r} is too large")
                    names.add(name)
                    src = tar.extractfile(member)
                    if src is None:  # pragma: no cover - regular files always have data
                        raise VerifyError(f"image archive member {name[:64]!r} has no data")
                    with src, open(dest / name, "wb") as f:
                        shutil.copyfileobj(src, f)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise VerifyError(f"image archive is not a readable tar: {e}") from e
        checksum_path = dest / CHECKSUM_FILE
        if not checksum_path.is_file():
            raise VerifyError(f"image archive has no {CHECKSUM_FILE}")
        checksum = checksum_path.read_bytes()
        if hashlib.sha256(checksum).digest() != os_image_hash:
            raise VerifyError(f"downloaded image is not {os_image_hash.hex()}")
        for path in dest.iterdir():
            if path.name == CHECKSUM_FILE:
                continue
            try:
                listed = checksum_entry(checksum, path.name)
            except ParseError:
                path.unlink()  # not part of the image's identity
                continue
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").digest()
            if digest != listed:
                raise VerifyError(f"downloaded image file {path.name} does not match its checksum")

    # ------------------------------------------------------------------ measurements
    def _disk_path(self, key: str) -> Path:
        return self.cache_dir / "measurements" / f"{hashlib.sha256(key.encode()).hexdigest()}.json"

    def _load(self, key: str) -> PartialMeasurements | None:
        path = self._disk_path(key)
        try:
            doc = json.loads(path.read_bytes()[: 1 << 16])
            if doc.get("version") != CACHE_VERSION or doc.get("key") != key:
                return None
            return PartialMeasurements.from_json_obj(doc["measurements"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring cached measurement %s: %s", path.name, e)
            return None

    def _store(self, key: str, partial: PartialMeasurements) -> None:
        path = self._disk_path(key)
        doc = {"version": CACHE_VERSION, "key": key, "measurements": partial.to_json_obj()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".mr-")
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("cannot cache measurement %s: %s", path.name, e)

    def _remember(self, key: str, partial: PartialMeasurements) -> None:
        self._memory[key] = partial
        self._memory.move_to_end(key)
        while len(self._memory) > MEMORY_ENTRIES:
            self._memory.popitem(last=False)

    async def partial(self, image: ImageDir, vm: VmMeasureConfig) -> PartialMeasurements:
        """the image's measurements for `vm` (RTMR0 without ACPI), from the cache or computed."""
        key = f"{image.identity.hex()}:{vm.measurement_key()}"
        hit = self._memory.get(key)
        if hit is not None:
            self._memory.move_to_end(key)
            return hit
        hit = self._load(key)
        if hit is None:
            hit = await asyncio.to_thread(image.partial, vm)
            self.computed += 1
            self._store(key, hit)
        self._remember(key, hit)
        return hit
