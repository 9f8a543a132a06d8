"""image directories, the image store (cache, downloads, measurement cache) and dstack-mr."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from aiohttp import web

from pydstack.attest.errors import ParseError, VerifyError
from pydstack.mr import cli
from pydstack.mr.image import ImageDir, ImageError
from pydstack.mr.lite import TdxImageMeasurement
from pydstack.mr.machine import VmMeasureConfig
from pydstack.mr.store import ImageStore
from pydstack.mr.tdvf import AcpiDigests, Tdvf, measure_log
from pydstack.vmm.backends.sandbox.image import (
    SANDBOX_IMAGE,
    ensure_sandbox_image,
    sandbox_image_digest,
)
from pydstack.vmm.td import TdIdentity, VmTd

from .synth import LAYOUT, expected_authenticode, expected_mrtd, firmware, image_dir, pe_kernel

GIB = 1 << 30
ACPI = AcpiDigests(b"\x01" * 48, b"\x02" * 48, b"\x03" * 48)


def _vm(image_hash: bytes, memory: int, qemu: str = "9.1.0") -> VmMeasureConfig:
    return VmMeasureConfig.from_obj(
        {"os_image_hash": image_hash.hex(), "memory_size": memory, "qemu_version": qemu}
    )


def test_image_measurements_follow_their_parts(tmp_path):
    h = image_dir(tmp_path / "img")
    image = ImageDir.open(tmp_path / "img")
    assert image.identity == h and image.version == "0.6.0" and not image.is_dev
    p = image.partial(_vm(h, 2 * GIB, "8.2.2"))
    assert p.mrtd == expected_mrtd(firmware(), LAYOUT, two_pass=True)
    assert p.td_hob_digest == Tdvf.parse(firmware()).td_hob_digest(2 * GIB)
    kernel_hash = p.rtmr1  # the patched kernel's digest is the first rtmr1 event
    from pydstack.mr.kernel import patch_kernel, rtmr1_log

    patched = patch_kernel(pe_kernel(), 6000, 2 * GIB)
    assert kernel_hash == measure_log(rtmr1_log(expected_authenticode(patched)))


@pytest.mark.parametrize("memory", [2 * GIB, 0xB0000000, 16 * GIB])
def test_lite_document_gives_the_full_measurement(tmp_path, memory):
    """what an image ships (measurement.tdx.cbor) verifies what the image files measure."""
    h = image_dir(tmp_path / "img")
    image = ImageDir.open(tmp_path / "img")
    for qemu in ("8.2.2", "9.1.0"):
        vm = _vm(h, memory, qemu)
        full = image.partial(vm).complete(ACPI)
        doc = TdxImageMeasurement.from_cbor(image.material().to_cbor())
        assert doc.measurements(vm, ACPI) == full


def test_tampered_or_unusable_images_are_refused(tmp_path):
    h = image_dir(tmp_path / "a")
    (tmp_path / "a" / "bzImage").write_bytes(pe_kernel(seed=b"other"))
    with pytest.raises(VerifyError, match="bzImage does not match"):
        ImageDir.open(tmp_path / "a").partial(_vm(h, 2 * GIB))
    h = image_dir(tmp_path / "b", fw=bytes(range(256)) * 1024)  # no tdvf (debian's ovmf)
    with pytest.raises(ParseError, match="no tdvf metadata"):
        ImageDir.open(tmp_path / "b").partial(_vm(h, 2 * GIB))
    h = image_dir(tmp_path / "c", extra={"kernel": "../bzImage"})
    with pytest.raises(ImageError, match="file name"):
        ImageDir.open(tmp_path / "c").partial(_vm(h, 2 * GIB))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "metadata.json").write_text("{}")
    with pytest.raises(ImageError, match=r"no sha256sum\.txt"):
        ImageDir.open(tmp_path / "d")


def test_sandbox_image_ships_what_its_td_measures(tmp_path):
    ensure_sandbox_image(tmp_path)
    image = ImageDir.open(tmp_path / SANDBOX_IMAGE)
    assert image.identity.hex() == sandbox_image_digest()
    td = VmTd.fresh(b"\x05" * 32, TdIdentity(sandbox_image_digest(), bytes(32)), tmp_path / "s")
    m = image.sandbox_measurements()
    assert (m.mrtd, m.rtmr0, m.rtmr1, m.rtmr2) == (td.mrtd, *td.rtmrs[:3])
    other = VmTd.fresh(b"\x05" * 32, TdIdentity("another image", bytes(32)), tmp_path / "t")
    assert other.mrtd != m.mrtd


# ---------------------------------------------------------------------------------- store


async def test_store_finds_images_by_identity(tmp_path):
    h = image_dir(tmp_path / "named-anyhow")
    ensure_sandbox_image(tmp_path)
    store = ImageStore(tmp_path)
    assert (await store.get(h)).path.name == "named-anyhow"
    assert (await store.get(bytes.fromhex(sandbox_image_digest()))).kind == "sandbox"
    with pytest.raises(VerifyError, match="not in the image cache"):
        await store.get(b"\x42" * 32)
    with pytest.raises(VerifyError, match="32 bytes"):
        await store.get(b"\x42")


async def test_measurements_are_cached_by_image_and_configuration(tmp_path):
    h = image_dir(tmp_path / "img")
    store = ImageStore(tmp_path)
    image = await store.get(h)
    first = await store.partial(image, _vm(h, 2 * GIB))
    assert await store.partial(image, _vm(h, 2 * GIB)) == first
    assert store.computed == 1
    assert await store.partial(image, _vm(h, 4 * GIB)) != first
    assert store.computed == 2
    fresh = ImageStore(tmp_path)  # a restarted process reads the disk cache
    assert await fresh.partial(image, _vm(h, 2 * GIB)) == first
    assert fresh.computed == 0
    for entry in (tmp_path / "measurements").iterdir():
        entry.write_text("{not json")
    again = ImageStore(tmp_path)
    assert await again.partial(image, _vm(h, 2 * GIB)) == first
    assert again.computed == 1


def _tar(files: dict[str, bytes], *, link: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


@pytest.fixture
async def image_server():
    served: dict[str, bytes] = {}
    hits: list[str] = []
    gate = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        hits.append(name)
        await gate.wait()
        if name not in served:
            return web.Response(status=404)
        return web.Response(body=served[name])

    app = web.Application()
    app.router.add_get("/{name}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/mr_{{OS_IMAGE_HASH}}.tar.gz", served, hits, gate
    await runner.cleanup()


def _image_files(tmp_path: Path) -> tuple[bytes, dict[str, bytes]]:
    h = image_dir(tmp_path / "src")
    return h, {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}


async def test_download_once_and_verify(tmp_path, image_server):
    url, served, hits, gate = image_server
    h, files = _image_files(tmp_path)
    served[f"mr_{h.hex()}.tar.gz"] = _tar({f"./{n}": d for n, d in files.items()} | {"extra": b"x"})
    store = ImageStore(tmp_path / "cache", url)
    waiters = [asyncio.ensure_future(store.get(h)) for _ in range(3)]
    while not hits:
        await asyncio.sleep(0)
    gate.set()
    images = await asyncio.gather(*waiters)
    assert len(hits) == 1  # one download for three callers
    assert images[0].path == tmp_path / "cache" / "images" / h.hex()
    assert not (images[0].path / "extra").exists()  # not in the manifest: dropped
    assert (await store.get(h)).path == images[0].path and len(hits) == 1


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda files: _tar(files, link="evil"), "not a plain file"),
        (lambda files: _tar({"sub/" + n: d for n, d in files.items()}), "not a plain file"),
        (lambda files: _tar({**files, "bzImage": b"changed"}), "does not match its checksum"),
        (
            lambda files: _tar({n: d for n, d in files.items() if n != "sha256sum.txt"}),
            "no sha256sum",
        ),
        (lambda files: b"not a tarball", "not a readable tar"),
        (lambda files: _tar({f"f{i}": b"" for i in range(70)}), "more than 64"),
    ],
)
async def test_bad_downloads_are_refused(tmp_path, image_server, make, reason):
    url, served, _, gate = image_server
    gate.set()
    h, files = _image_files(tmp_path)
    served[f"mr_{h.hex()}.tar.gz"] = make(files)
    store = ImageStore(tmp_path / "cache", url)
    with pytest.raises(VerifyError, match=reason):
        await store.get(h)
    assert not (tmp_path / "cache" / "images" / h.hex()).exists()


async def test_download_of_another_image_or_too_much_is_refused(tmp_path, image_server):
    url, served, _, gate = image_server
    gate.set()
    h, files = _image_files(tmp_path)
    other = hashlib.sha256(b"other").digest()
    served[f"mr_{other.hex()}.tar.gz"] = _tar(files)
    with pytest.raises(VerifyError, match="is not"):
        await ImageStore(tmp_path / "cache", url).get(other)
    served[f"mr_{h.hex()}.tar.gz"] = _tar(files)
    with pytest.raises(VerifyError, match="exceeds"):
        await ImageStore(tmp_path / "cache", url, max_download=100).get(h)
    with pytest.raises(VerifyError, match="cannot download"):
        await ImageStore(tmp_path / "c2", "http://127.0.0.1:1/{OS_IMAGE_HASH}").get(h)
    with pytest.raises(ValueError, match="must contain"):
        ImageStore(tmp_path, "http://example/x.tar.gz")


# ---------------------------------------------------------------------------------- dstack-mr


def test_cli_measure_and_cbor(tmp_path, capsys):
    h = image_dir(tmp_path / "img")
    out = tmp_path / "measurement.tdx.cbor"
    acpi = ",".join(d.hex() for d in (ACPI.loader, ACPI.rsdp, ACPI.tables))
    args = ["measure", str(tmp_path / "img" / "metadata.json"), "-m", "2G", "--json"]
    assert cli.main([*args, "--acpi-digests", acpi, "--cbor-out", str(out)]) == 0
    got = json.loads(capsys.readouterr().out)
    full = ImageDir.open(tmp_path / "img").partial(_vm(h, 2 * GIB)).complete(ACPI)
    assert got == full.to_json_obj()
    assert out.read_bytes() == ImageDir.open(tmp_path / "img").material().to_cbor()
    assert cli.main(["measure", str(tmp_path / "img"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rtmr0"] is None  # no acpi digests given
    ensure_sandbox_image(tmp_path / "sb")
    assert cli.main(["measure", str(tmp_path / "sb" / SANDBOX_IMAGE), "--json"]) == 0
    sandbox = json.loads(capsys.readouterr().out)
    assert (
        sandbox
        == ImageDir.open(tmp_path / "sb" / SANDBOX_IMAGE).sandbox_measurements().to_json_obj()
    )


def test_cli_lite_on_the_fixture(vectors, capsys):
    path = vectors / "dstack/verifier_tdx-lite-getquote.json"
    assert cli.main(["lite", str(path), "--event-log", str(path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    from pydstack.attest.quote import parse_quote

    report = parse_quote(bytes.fromhex(json.loads(path.read_text())["quote"])).td_report
    assert got["mrtd"] == report.mr_td.hex() and got["rtmr0"] == report.rtmr0.hex()


def test_cli_reports_errors(tmp_path, capsys):
    image_dir(tmp_path / "img", fw=b"\0" * 4096)
    assert cli.main(["measure", str(tmp_path / "img")]) == 1
    assert "no tdvf metadata" in capsys.readouterr().err
    assert cli.main(["measure", str(tmp_path / "missing")]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert cli.parse_size("2G") == 2 * GIB and cli.parse_size("512MiB") == 512 << 20


def test_sandbox_measurement_file_must_be_the_images(tmp_path):
    ensure_sandbox_image(tmp_path)
    path = tmp_path / SANDBOX_IMAGE / "measurement.sandbox.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "os_image_hash": "00" * 32}))
    with pytest.raises(ImageError, match="for another image"):
        ImageDir.open(tmp_path / SANDBOX_IMAGE).sandbox_measurements()
    path.write_text(json.dumps({**doc, "mrtd": "00"}))
    with pytest.raises(ImageError, match="malformed"):
        ImageDir.open(tmp_path / SANDBOX_IMAGE).sandbox_measurements()


def test_a_digest_file_must_agree_with_the_manifest(tmp_path):
    h = image_dir(tmp_path / "img")
    (tmp_path / "img" / "digest.txt").write_text(h.hex())
    assert ImageDir.open(tmp_path / "img").identity == h
    (tmp_path / "img" / "digest.txt").write_text("ab" * 32)
    with pytest.raises(ImageError, match=r"is not sha256\(sha256sum\.txt\)"):
        ImageDir.open(tmp_path / "img")
