"""the registry client: references, bounded and digest-checked reads, safe layer unpacking,
and the VMM's image store (pull while pulling, delete rules)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tarfile

import httpx
import pytest

from pydstack.vmm import registry as reg
from pydstack.vmm.image_store import ImageStore, ImageStoreError, image_dir_name
from pydstack.vmm.registry import (
    ImageRefError,
    RegistryClient,
    RegistryError,
    Repository,
    extract_layer,
    parse_reference,
)


# ---------------------------------------------------------------------- references
def test_references():
    assert Repository.parse("http://127.0.0.1:5000/dstack/guest") == Repository(
        "http", "127.0.0.1:5000", "dstack/guest"
    )
    assert Repository.parse("ghcr.io/dstack-tee/guest-image").scheme == "https"
    assert Repository.parse("dstacktee/guest-image").host == "registry-1.docker.io"
    assert parse_reference("http://localhost:5000/os:0.6.0")[1] == "0.6.0"
    for bad in ("nohost", "http://h:1/", "h:1/UPPER", "h:1/a/../b", "h:1/a b"):
        with pytest.raises(ImageRefError):
            Repository.parse(bad)
    for bad in ("h:1/os", "h:1/os:../x", "h:1/os:.hidden", "h:1/os:a/b", "h:1/os:" + "a" * 129):
        with pytest.raises(ImageRefError):
            parse_reference(bad)


# ---------------------------------------------------------------------- unpacking
def tar_of(*members: tuple[tarfile.TarInfo, bytes | None], gz: bool = False) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as t:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    return info


def test_a_good_layer_unpacks_with_links_and_whiteouts(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    extract_layer(
        tar_of(
            (member("./metadata.json"), b"{}"),
            (member("bin", tarfile.DIRTYPE, mode=0o755), None),
            (member("bin/tool", mode=0o4755), b"x"),
            (member("bin/alias", tarfile.SYMTYPE, "tool"), None),
            (member("bin/up", tarfile.SYMTYPE, "../metadata.json"), None),
            (member("hard", tarfile.LNKTYPE, "bin/tool"), None),
            (member("old"), b"gone soon"),
            gz=True,
        ),
        root,
    )
    extract_layer(tar_of((member(".wh.old"), b"")), root)
    assert (root / "metadata.json").read_bytes() == b"{}"
    assert (root / "bin/alias").resolve() == (root / "bin/tool").resolve()
    assert (root / "bin/tool").stat().st_mode & 0o7777 == 0o755  # setuid dropped
    assert (root / "hard").read_bytes() == b"x"
    assert not (root / "old").exists()


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([(member("/etc/passwd"), b"x")], "absolute"),
        ([(member("a/../../escape"), b"x")], "leaves the image directory"),
        ([(member("l", tarfile.SYMTYPE, "/etc"), None)], "leaves the image"),
        ([(member("d/l", tarfile.SYMTYPE, "../../x"), None)], "leaves the image"),
        (
            [(member("l", tarfile.SYMTYPE, "."), None), (member("l/evil"), b"x")],
            "goes through a symlink",
        ),
        ([(member("h", tarfile.LNKTYPE, "/etc/passwd"), None)], "absolute"),
        ([(member("h", tarfile.LNKTYPE, "missing"), None)], "earlier file"),
        ([(member("dev/null", tarfile.CHRTYPE), None)], "device file"),
        ([(member("dev/sda", tarfile.BLKTYPE), None)], "device file"),
        ([(member("fifo", tarfile.FIFOTYPE), None)], "special file"),
    ],
)
def test_unsafe_layers_are_refused(tmp_path, members, message):
    root = tmp_path / "img"
    root.mkdir()
    with pytest.raises(RegistryError, match=message):
        extract_layer(tar_of(*members), root)
    outside = {p.name for p in tmp_path.iterdir()}
    assert outside == {"img"}  # nothing written beside the target


def test_unpacking_is_bounded(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    with pytest.raises(RegistryError, match=r"more than \d+ entries"):
        extract_layer(
            tar_of(*[(member(f"f{i}"), b"") for i in range(3)]), root, reg._Budget(entries=2)
        )
    with pytest.raises(RegistryError, match="unpacks to more than"):
        extract_layer(tar_of((member("big"), b"x" * 11)), root, reg._Budget(bytes=10))
    with pytest.raises(RegistryError, match="not a tar archive"):
        extract_layer(io.BytesIO(b"not a tar at all" * 100), root)


# ---------------------------------------------------------------------- a fake registry
def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeRegistry:
    """the registry v2 read API over blobs and manifests it holds (a MockTransport)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, bytes] = {}
        self.gate: asyncio.Event | None = None

    def add_image(self, tag: str, files: dict[str, bytes], **override: object) -> dict:
        layer = tar_of(*[(member(n), d) for n, d in files.items()], gz=True).getvalue()
        config = b'{"rootfs":{"type":"layers"}}'
        self.blobs[digest(layer)] = layer
        self.blobs[digest(config)] = config
        manifest = {
            "schemaVersion": 2,
            "mediaType": reg.OCI_MANIFEST,
            "config": {"mediaType": reg.OCI_CONFIG, "digest": digest(config), "size": len(config)},
            "layers": [
                {"mediaType": reg.OCI_LAYER_GZIP, "digest": digest(layer), "size": len(layer)}
            ],
            **override,
        }
        self.manifests[tag] = json.dumps(manifest).encode()
        return manifest

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if self.gate is not None:
            await self.gate.wait()
        path = request.url.path
        if path.endswith("/tags/list"):
            return httpx.Response(200, json={"tags": sorted(self.manifests)})
        ref = path.rsplit("/", 1)[1]
        if "/manifests/" in path and ref in self.manifests:
            return httpx.Response(200, content=self.manifests[ref])
        if "/blobs/" in path and ref in self.blobs:
            return httpx.Response(200, content=self.blobs[ref])
        return httpx.Response(404, text="unknown")

    def client(self) -> RegistryClient:
        repo = Repository.parse("http://reg.test:5000/os")
        return RegistryClient(repo, transport=httpx.MockTransport(self.handle))


async def test_pull_unpacks_a_good_image(tmp_path):
    fake = FakeRegistry()
    fake.add_image("1.0", {"metadata.json": b'{"kind":"sandbox"}', "digest.txt": b"ab"})
    async with fake.client() as c:
        assert await c.list_tags() == ["1.0"]
        await c.pull("1.0", tmp_path / "dstack-1.0")
    assert (tmp_path / "dstack-1.0/digest.txt").read_bytes() == b"ab"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dstack-1.0"]


async def test_pulls_of_bad_images_fail_and_leave_nothing(tmp_path):
    fake = FakeRegistry()
    fake.add_image("nometa", {"other": b"x"})
    good = fake.add_image("tampered", {"metadata.json": b'{"tampered":1}'})
    blob = fake.blobs[good["layers"][0]["digest"]]
    fake.blobs[good["layers"][0]["digest"]] = blob[:-1] + bytes([blob[-1] ^ 1])  # same size
    fake.add_image("many", {"metadata.json": b"{}"}, layers=[good["layers"][0]] * 65)
    fake.add_image("bigcfg", {"metadata.json": b"{}"}, config={**good["config"], "size": 2**21})
    fake.manifests["huge"] = b" " * (reg.MAX_MANIFEST + 1)
    fake.add_image("plugin", {"metadata.json": b"{}"})
    fake.manifests["plugin"] = fake.manifests["plugin"].replace(
        reg.OCI_LAYER_GZIP.encode(), b"application/vnd.example.plugin"
    )
    cases = {
        "nometa": "no metadata.json",
        "tampered": "does not match its digest",
        "many": "65 layers",
        "bigcfg": "over the 1048576 limit",
        "huge": "manifest is over",
        "plugin": "unsupported layer type",
        "missing": "registry answered 404",
    }
    async with fake.client() as c:
        for tag, message in cases.items():
            with pytest.raises(RegistryError, match=message):
                await c.pull(tag, tmp_path / image_dir_name(tag))
    assert list(tmp_path.iterdir()) == []


async def test_a_manifest_fetched_by_digest_must_hash_to_it(tmp_path):
    fake = FakeRegistry()
    fake.add_image("1.0", {"metadata.json": b"{}"})
    wrong = digest(b"something else")
    fake.manifests[wrong] = fake.manifests["1.0"]
    fake.manifests["idx"] = json.dumps(
        {"mediaType": reg.OCI_INDEX, "manifests": [{"digest": wrong, "size": 1}]}
    ).encode()
    async with fake.client() as c:
        with pytest.raises(RegistryError, match="manifest digest mismatch"):
            await c.pull("idx", tmp_path / "dstack-idx")


# ---------------------------------------------------------------------- the vmm's store
async def test_the_store_refuses_a_second_pull_and_bad_deletes(tmp_path, monkeypatch):
    fake = FakeRegistry()
    fake.add_image("1.0", {"metadata.json": b"{}"})
    fake.gate = asyncio.Event()
    monkeypatch.setattr(
        "pydstack.vmm.image_store.RegistryClient",
        lambda repo, **kw: RegistryClient(repo, transport=httpx.MockTransport(fake.handle)),
    )
    images = tmp_path / "images"
    (images / "pydstack-sandbox").mkdir(parents=True)
    (images / "used").mkdir()
    (tmp_path / "outside").mkdir()
    store = ImageStore(
        images,
        "http://reg.test:5000/os",
        in_use=lambda: {"used"},
        builtin=frozenset({"pydstack-sandbox"}),
    )
    store.pull("1.0")
    with pytest.raises(ImageStoreError, match="already being pulled"):
        store.pull("1.0")
    with pytest.raises(ImageStoreError, match="being pulled"):
        store.delete("dstack-1.0")
    assert "1.0" in store.pulling
    fake.gate.set()
    await store.wait("1.0")
    assert (images / "dstack-1.0/metadata.json").exists()
    with pytest.raises(ImageStoreError, match="already exists"):
        store.pull("1.0")
    for name, message in {
        "../outside": "invalid image name",
        "..": "invalid image name",
        "a/b": "invalid image name",
        "pydstack-sandbox": "built-in image",
        "used": "in use by a vm",
        "nothing": "not found",
    }.items():
        with pytest.raises(ImageStoreError, match=message):
            store.delete(name)
    assert (tmp_path / "outside").exists() and (images / "used").exists()
    for tag in ("../x", "", "-x", "a b"):
        with pytest.raises(ImageStoreError, match="invalid image tag"):
            store.pull(tag)
    store.delete("dstack-1.0")
    assert not (images / "dstack-1.0").exists()
    [info] = (await store.list()).images
    assert (info.tag, info.local, info.pulling, info.error) == ("1.0", False, False, "")


async def test_a_failed_pull_shows_its_error(tmp_path, monkeypatch):
    fake = FakeRegistry()
    fake.add_image("bad", {"no-metadata": b""})
    monkeypatch.setattr(
        "pydstack.vmm.image_store.RegistryClient",
        lambda repo, **kw: RegistryClient(repo, transport=httpx.MockTransport(fake.handle)),
    )
    store = ImageStore(tmp_path, "http://reg.test:5000/os", in_use=set)
    store.pull("bad")
    await store.wait("bad")
    [info] = (await store.list()).images
    assert not info.local and not info.pulling and "no metadata.json" in info.error
    assert list(tmp_path.iterdir()) == []


def test_no_registry_configured(tmp_path):
    store = ImageStore(tmp_path, "", in_use=set)
    with pytest.raises(ImageStoreError, match="no image registry is configured"):
        store.pull("1.0")
    assert asyncio.run(store.list()).images == []
