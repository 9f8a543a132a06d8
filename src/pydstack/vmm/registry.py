"""an OCI distribution (registry v2) client for guest OS images: list tags, pull an image's
layers into a directory, publish a directory as a one-layer image.

Everything read from a registry is bounded and checked before use: manifests (and indexes)
up to MAX_MANIFEST bytes, image configs up to MAX_CONFIG, at most MAX_LAYERS layers each up to
MAX_LAYER bytes, tag lists up to MAX_TAG_LIST; every blob (config and layers) is hashed as it
streams to disk and refused unless its sha256 and size match the manifest's descriptor, and a
manifest fetched by digest must hash to it. Layers are unpacked by :func:`extract_layer`, which
refuses absolute paths, `..`, entries through a symlink, links leaving the target, device files
and FIFOs, and bounds the entry count and the unpacked size.

References: `[http://|https://]host[:port]/repo/name[:tag]` (no scheme: https, as upstream);
a first component without `.` or `:` is a Docker Hub name (`registry-1.docker.io`). Registries
that require a token (Docker Hub) are not supported: anonymous access only.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import httpx

from pydstack.errors import DstackError, InputError
from pydstack.types.netaddr import ascii_decimal

MAX_MANIFEST = 4 * 1024 * 1024
MAX_CONFIG = 1024 * 1024
MAX_TAG_LIST = 4 * 1024 * 1024
MAX_LAYERS = 64
MAX_LAYER = 8 * 1024**3
#: what one image may unpack to, in bytes and in entries
MAX_UNPACKED = 32 * 1024**3
MAX_ENTRIES = 200_000
MAX_TAG_PAGES = 100

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        OCI_LAYER_GZIP,
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    }
)
ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
REPO_RE = re.compile(r"[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*")
HOST_RE = re.compile(r"[A-Za-z0-9.-]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
DOCKER_HUB = "registry-1.docker.io"


class RegistryError(DstackError):
    """a registry cannot be reached, refused, or sent something malformed or unsafe."""


class ImageRefError(InputError):
    """a registry, repository or tag name is malformed."""


def validate_tag(tag: str) -> str:
    """`tag` if it is an OCI tag (letters, digits, `_ . -`, not starting with `.` or `-`, at
    most 128); ImageRefError otherwise (so it can never name a path outside one directory)."""
    if not TAG_RE.fullmatch(tag):
        raise ImageRefError(f"invalid image tag {tag[:80]!r}")
    return tag


@dataclass(frozen=True)
class Repository:
    scheme: str
    host: str
    name: str

    @classmethod
    def parse(cls, ref: str) -> Repository:
        """`[scheme://]host[:port]/name`; ImageRefError for anything else."""
        scheme = "https"
        for prefix in ("http://", "https://"):
            if ref.startswith(prefix):
                scheme, ref = prefix[:-3], ref[len(prefix) :]
        first, sep, rest = ref.partition("/")
        if not sep or not rest:
            raise ImageRefError(f"invalid image repository {ref[:200]!r}: no repository path")
        if "." not in first and ":" not in first and first != "localhost":
            first, rest = DOCKER_HUB, ref  # docker hub: "user/repo"
        if not HOST_RE.fullmatch(first):
            raise ImageRefError(f"invalid registry host {first[:100]!r}")
        if not REPO_RE.fullmatch(rest) or len(rest) > 255:
            raise ImageRefError(f"invalid repository name {rest[:200]!r}")
        return cls(scheme, first, rest)

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}/v2/{self.name}"

    def __str__(self) -> str:
        return f"{self.host}/{self.name}"


def parse_reference(ref: str) -> tuple[Repository, str]:
    """`[scheme://]host[:port]/name:tag` (tag required) -> (repository, tag)."""
    head, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        raise ImageRefError(f"image reference {ref[:200]!r} has no tag (name:tag)")
    return Repository.parse(head), validate_tag(tag)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int

    @classmethod
    def parse(cls, obj: object, what: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise RegistryError(f"{what} is not a descriptor object")
        digest, size = obj.get("digest"), obj.get("size")
        media = obj.get("mediaType", "")
        if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
            raise RegistryError(f"{what} has no sha256 digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RegistryError(f"{what} has no valid size")
        if not isinstance(media, str):
            raise RegistryError(f"{what} has an invalid media type")
        return cls(media, digest, size)


class RegistryClient:
    """one repository of a registry (anonymous access); use as an async context manager."""

    def __init__(self, repo: Repository, *, timeout: float = 600.0, transport: Any = None) -> None:
        self.repo = repo
        self.http = httpx.AsyncClient(timeout=timeout, transport=transport, verify=True)

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.http.aclose()

    @contextlib.asynccontextmanager
    async def _get(
        self, url: str, headers: dict[str, str] | None = None
    ) -> AsyncIterator[httpx.Response]:
        try:
            async with self.http.stream("GET", url, headers=headers) as r:
                if r.status_code == 401:
                    raise RegistryError(
                        f"registry {self.repo.host} requires authentication (not supported)"
                    )
                if r.status_code != 200:
                    text = (await _read_capped(r, 2000, "error body", truncate=True)).decode(
                        errors="replace"
                    )
                    raise RegistryError(f"registry answered {r.status_code} for {url}: {text}")
                yield r
        except httpx.HTTPError as e:
            raise RegistryError(f"cannot reach registry {self.repo.host}: {e}") from e

    async def list_tags(self) -> list[str]:
        """every tag of the repository (following `Link` pages, at most MAX_TAG_PAGES)."""
        tags: list[str] = []
        url: str | None = f"{self.repo.base}/tags/list"
        for _ in range(MAX_TAG_PAGES):
            if url is None:
                return tags
            async with self._get(url) as r:
                body = await _read_capped(r, MAX_TAG_LIST, "tag list")
                link = r.headers.get("link", "")
            doc = _json(body, "tag list")
            page = doc.get("tags") or []
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise RegistryError("the registry's tag list is malformed")
            tags += page
            url = _next_link(link, self.repo)
        raise RegistryError(f"the tag list has more than {MAX_TAG_PAGES} pages")

    async def manifest(self, reference: str) -> tuple[dict[str, Any], str]:
        """the image manifest of a tag or digest (an index resolves to its first entry that is
        not an attestation); returns it with its media type."""
        for _ in range(2):
            async with self._get(
                f"{self.repo.base}/manifests/{reference}", {"Accept": ACCEPT}
            ) as r:
                body = await _read_capped(r, MAX_MANIFEST, "manifest")
                header_digest = r.headers.get("docker-content-digest", "")
                media = r.headers.get("content-type", "").split(";")[0].strip()
            actual = "sha256:" + hashlib.sha256(body).hexdigest()
            if DIGEST_RE.fullmatch(reference) and actual != reference:
                raise RegistryError(f"manifest digest mismatch: asked {reference}, got {actual}")
            if header_digest and DIGEST_RE.fullmatch(header_digest) and actual != header_digest:
                raise RegistryError("the manifest does not match the registry's digest header")
            doc = _json(body, "manifest")
            media = str(doc.get("mediaType") or media)
            if media in (OCI_INDEX, DOCKER_LIST) or "manifests" in doc:
                entries = doc.get("manifests")
                if not isinstance(entries, list) or not entries:
                    raise RegistryError("the image index lists no manifests")
                chosen = next(
                    (
                        e
                        for e in entries
                        if isinstance(e, dict) and "attestation" not in str(e.get("mediaType"))
                    ),
                    None,
                )
                reference = Descriptor.parse(chosen, "index entry").digest
                continue
            return doc, media
        raise RegistryError("the image index points to another index")

    async def blob(self, d: Descriptor, out: IO[bytes], limit: int) -> None:
        """stream blob `d` into `out`, refusing it unless its size and sha256 match."""
        if d.size > limit:
            raise RegistryError(f"blob {d.digest} is {d.size} bytes, over the {limit} limit")
        h = hashlib.sha256()
        n = 0
        async with self._get(f"{self.repo.base}/blobs/{d.digest}") as r:
            async for chunk in r.aiter_bytes():
                n += len(chunk)
                if n > d.size:
                    raise RegistryError(f"blob {d.digest} is larger than its descriptor says")
                h.update(chunk)
                out.write(chunk)
        if n != d.size or "sha256:" + h.hexdigest() != d.digest:
            raise RegistryError(f"blob {d.digest} does not match its digest")

    async def pull(self, tag: str, dest: Path) -> None:
        """unpack the image `tag` into the new directory `dest` (made next to it first, then
        renamed into place; nothing is left behind on failure). It must hold metadata.json."""
        validate_tag(tag)
        if dest.exists():
            raise RegistryError(f"image directory {dest.name} already exists")
        doc, _ = await self.manifest(tag)
        raw_layers = doc.get("layers")
        if not isinstance(raw_layers, list) or not raw_layers:
            raise RegistryError("the manifest lists no layers")
        if len(raw_layers) > MAX_LAYERS:
            raise RegistryError(f"the image has {len(raw_layers)} layers (at most {MAX_LAYERS})")
        layers = [Descriptor.parse(x, f"layer {i}") for i, x in enumerate(raw_layers)]
        for layer in layers:
            if layer.media_type and layer.media_type not in LAYER_TYPES:
                raise RegistryError(f"unsupported layer type {layer.media_type[:100]!r}")
        config = Descriptor.parse(doc.get("config"), "config")
        cfg = io.BytesIO()
        await self.blob(config, cfg, MAX_CONFIG)
        _json(cfg.getvalue(), "image config")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".pull-{tag}-", dir=dest.parent))
        try:
            budget = _Budget()
            for layer in layers:
                with tempfile.TemporaryFile(dir=dest.parent) as f:
                    await self.blob(layer, f, MAX_LAYER)
                    f.seek(0)
                    extract_layer(f, tmp, budget)
            if not (tmp / "metadata.json").is_file():
                raise RegistryError("the image has no metadata.json: not a dstack guest image")
            os.chmod(tmp, 0o755)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    async def push_dir(self, src: Path, tag: str) -> str:
        """publish directory `src` as `tag`: an OCI image of one gzip tar layer (regular files,
        directories and symlinks, sorted, owner 0, mtime 0, so the same tree gives the same
        digest); returns the manifest digest."""
        validate_tag(tag)
        if not src.is_dir():
            raise RegistryError(f"{src} is not a directory")
        with tempfile.TemporaryFile() as layer:
            diff_id = _write_layer(src, layer)
            size = layer.tell()
            layer.seek(0)
            layer_digest = "sha256:" + _sha256_file(layer)
            config = json.dumps(
                {
                    "architecture": "amd64",
                    "os": "linux",
                    "config": {},
                    "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                },
                separators=(",", ":"),
            ).encode()
            config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
            await self._upload(config_digest, io.BytesIO(config), len(config))
            layer.seek(0)
            await self._upload(layer_digest, layer, size)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer_digest, "size": size}],
            },
            separators=(",", ":"),
        ).encode()
        url = f"{self.repo.base}/manifests/{tag}"
        await self._send("PUT", url, manifest, {"Content-Type": OCI_MANIFEST}, expect=201)
        return "sha256:" + hashlib.sha256(manifest).hexdigest()

    async def _upload(self, digest: str, data: IO[bytes], size: int) -> None:
        try:
            head = await self.http.head(f"{self.repo.base}/blobs/{digest}")
        except httpx.HTTPError as e:
            raise RegistryError(f"cannot reach registry {self.repo.host}: {e}") from e
        if head.status_code == 200:
            return  # already there
        r = await self._send("POST", f"{self.repo.base}/blobs/uploads/", b"", {}, expect=202)
        location = r.headers.get("location", "")
        if not location:
            raise RegistryError("the registry gave no upload location")
        url = str(httpx.URL(self.repo.base).join(location))
        url += ("&" if "?" in url else "?") + f"digest={digest}"

        async def body() -> AsyncIterator[bytes]:
            while chunk := data.read(1 << 20):
                yield chunk

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        await self._send("PUT", url, body(), headers, expect=201)

    async def _send(
        self, method: str, url: str, content: Any, headers: dict[str, str], *, expect: int
    ) -> httpx.Response:
        try:
            r = await self.http.request(method, url, content=content, headers=headers)
        except httpx.HTTPError as e:
            raise RegistryError(f"cannot reach registry {self.repo.host}: {e}") from e
        if r.status_code != expect:
            raise RegistryError(
                f"registry answered {r.status_code} to {method} {url.split('?')[0]}: {r.text[:500]}"
            )
        return r


async def _read_capped(
    r: httpx.Response, limit: int, what: str, *, truncate: bool = False
) -> bytes:
    length = ascii_decimal(r.headers.get("content-length", ""), 20)
    if not truncate and length is not None and length > limit:
        raise RegistryError(f"the registry's {what} is over {limit} bytes")
    buf = bytearray()
    async for chunk in r.aiter_bytes():
        buf += chunk
        if len(buf) > limit:
            if truncate:
                return bytes(buf[:limit])
            raise RegistryError(f"the registry's {what} is over {limit} bytes")
    return bytes(buf)


def _json(body: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise RegistryError(f"the registry's {what} is not json: {e}") from e
    if not isinstance(doc, dict):
        raise RegistryError(f"the registry's {what} is not a json object")
    return doc


def _next_link(link: str, repo: Repository) -> str | None:
    """the next page of a paginated list (`Link: </v2/...>; rel="next"`), on the same host."""
    m = re.match(r'\s*<([^>]+)>\s*;\s*rel="?next"?', link)
    if not m:
        return None
    target = m.group(1)
    if not target.startswith(f"/v2/{repo.name}/tags/list"):
        raise RegistryError("the registry's next-page link leaves the tag list")
    return f"{repo.scheme}://{repo.host}{target}"


def _sha256_file(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


class _HashingWriter(io.RawIOBase):
    """a write-only stream that hashes what passes through it to `out`."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.hash = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.hash.update(data)
        self.out.write(data)
        return len(data)


def _write_layer(src: Path, out: IO[bytes]) -> str:
    """gzip tar of `src` into `out`; returns the uncompressed tar's digest (the diff id)."""
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        raw = _HashingWriter(gz)  # type: ignore[arg-type]
        with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(src.rglob("*")):
                st = path.lstat()
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)) and not (
                    stat.S_ISLNK(st.st_mode)
                ):
                    continue  # sockets, devices, fifos have no place in an image
                info = tar.gettarinfo(str(path), arcname=path.relative_to(src).as_posix())
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                if info.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
        return "sha256:" + raw.hash.hexdigest()


# ---------------------------------------------------------------------- safe unpacking
@dataclass
class _Budget:
    """what an image may still unpack to, across its layers."""

    bytes: int = MAX_UNPACKED
    entries: int = MAX_ENTRIES


def _member_path(name: str) -> PurePosixPath:
    """a member's path relative to the target; RegistryError for absolute paths and `..`."""
    if name.startswith("/") or "\\" in name or "\0" in name:
        raise RegistryError(f"layer entry {name[:200]!r} has an absolute or odd path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise RegistryError(f"layer entry {name[:200]!r} leaves the image directory")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _parent_dir(root: Path, rel: PurePosixPath) -> Path:
    """the real directory an entry goes into, made if missing; refuses a path through a
    symlink or a non-directory (an earlier entry could have planted one)."""
    d = root
    for part in rel.parent.parts:
        d = d / part
        try:
            st = d.lstat()
        except FileNotFoundError:
            d.mkdir(mode=0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise RegistryError(f"layer entry {str(rel)[:200]!r} goes through a symlink")
        if not stat.S_ISDIR(st.st_mode):
            raise RegistryError(f"layer entry {str(rel)[:200]!r} goes through a file")
    return d


def _remove(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def _inside(link_dir: PurePosixPath, target: str) -> bool:
    """whether a symlink in `link_dir` (relative to root) pointing at `target` stays inside."""
    if target.startswith("/"):
        return False
    depth = len(link_dir.parts)
    for part in target.split("/"):
        if part in ("", "."):
            continue
        depth = depth - 1 if part == ".." else depth + 1
        if depth < 0:
            return False
    return True


def extract_layer(f: IO[bytes], root: Path, budget: _Budget | None = None) -> None:
    """unpack one layer (tar, gzip or not) into `root`, applying OCI whiteouts (`.wh.NAME`
    removes NAME, `.wh..wh..opq` empties its directory).

    Raises RegistryError, leaving `root` partly written (the caller discards it), for: absolute
    paths, `..`, an entry whose parent is a symlink or a file, a symlink pointing outside
    `root` (absolute or climbing out), a hard link to anything but an earlier regular file of
    the image, device files and FIFOs, more than the budget's entries or bytes. Files keep their
    permission bits (setuid, setgid and sticky dropped) and are owned by the caller.
    """
    budget = budget or _Budget()
    root = root.resolve()
    try:
        tar = tarfile.open(fileobj=f, mode="r|*")  # noqa: SIM115 - closed by the with below
    except tarfile.TarError as e:
        raise RegistryError(f"a layer is not a tar archive: {e}") from e
    try:
        with tar:
            for m in tar:
                budget.entries -= 1
                if budget.entries < 0:
                    raise RegistryError(f"the image has more than {MAX_ENTRIES} entries")
                rel = _member_path(m.name)
                if rel == PurePosixPath("."):
                    continue
                parent = _parent_dir(root, rel)
                base = rel.name
                if base.startswith(".wh."):
                    if base == ".wh..wh..opq":
                        for child in list(parent.iterdir()):
                            _remove(child)
                    else:
                        _remove(parent / base[4:])
                    continue
                target = parent / base
                if m.isdir():
                    if target.is_symlink() or (target.exists() and not target.is_dir()):
                        _remove(target)
                    target.mkdir(mode=0o755, exist_ok=True)
                    os.chmod(target, m.mode & 0o777)
                elif m.isreg():
                    budget.bytes -= m.size
                    if budget.bytes < 0:
                        raise RegistryError(f"the image unpacks to more than {MAX_UNPACKED} bytes")
                    _remove(target)
                    src = tar.extractfile(m)
                    if src is None:
                        raise RegistryError(f"layer entry {str(rel)[:200]!r} has no data")
                    fd = os.open(
                        target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600
                    )
                    with os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                    os.chmod(target, m.mode & 0o777)
                elif m.issym():
                    if not _inside(rel.parent, m.linkname):
                        raise RegistryError(
                            f"symlink {str(rel)[:200]!r} -> {m.linkname[:200]!r} leaves the image"
                        )
                    _remove(target)
                    os.symlink(m.linkname, target)
                elif m.islnk():
                    source = root / _member_path(m.linkname)
                    if source.is_symlink() or not source.is_file():
                        raise RegistryError(
                            f"hard link {str(rel)[:200]!r} -> {m.linkname[:200]!r} does not name "
                            "an earlier file of the image"
                        )
                    if not str(source.resolve()).startswith(str(root) + os.sep):
                        raise RegistryError(f"hard link {str(rel)[:200]!r} leaves the image")
                    _remove(target)
                    os.link(source, target)
                else:
                    kind = "device file" if (m.ischr() or m.isblk()) else "special file"
                    raise RegistryError(f"layer entry {str(rel)[:200]!r} is a {kind}")
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as e:
        raise RegistryError(f"cannot unpack a layer: {e}") from e
