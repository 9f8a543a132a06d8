"""build a guest OS image for the qemu backend from Debian packages, in upstream's layout.

    python -m pydstack.vmm.backends.qemu.image_build --flavour dev --out DIR [--cache DIR]
    (also `dstack image build`)

The image directory holds `metadata.json`, `bzImage` (Debian's linux-image-amd64), the
`initramfs.cpio.gz` built here (:mod:`.initramfs`), `rootfs.squashfs` and `ovmf.fd` (Debian's
ovmf), `packages.txt` (every Debian package and Python wheel with its version),
`sha256sum.txt` over all of them and `digest.txt` = sha256(sha256sum.txt), the `os_image_hash`.

The rootfs (mmdebstrap, bookworm) holds python3 with pydstack installed from this checkout as a
wheel (its dependencies pinned to the versions of the running environment), podman with crun,
cryptsetup, wireguard-tools and iproute2; `/sbin/dstack-init` starts the guest
(:mod:`pydstack.guest.qemu_init`). Flavours: `dev` (`is_dev: true`) can use the VMM's simulated
TD when the host share asks for it (upstream's no-TEE development mode) and ships
`measurement.simulated.json`, the registers that TD has; `prod` has no simulator in its rootfs
(no host-side TD client, no mock PKI) and boots only on real TDX.

Reproducible: SOURCE_DATE_EPOCH (default: a fixed date) dates everything, files are sorted, the
squashfs is built with `-reproducible`; the same packages and checkout give the same bytes and
so the same os_image_hash. Downloads are cached (`--cache`, default `.cache/guest-image`):
Debian packages and wheels are fetched once. Progress goes to stderr, one line per step.

Needs root (mmdebstrap's root mode) and mmdebstrap, squashfs-tools, busybox-static on the host.
Errors: :class:`ImageBuildError` naming the step that failed; nothing is left in `--out` then.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydstack import __version__
from pydstack.errors import DstackError
from pydstack.mr.image import SIMULATED_MEASUREMENT, simulated_measurement_doc

from .initramfs import InitramfsError, build_initramfs

SUITE = "bookworm"
#: 2026-01-01T00:00:00Z: the date of every file unless SOURCE_DATE_EPOCH says otherwise
DEFAULT_EPOCH = 1767225600
FLAVOURS = ("dev", "prod")
PACKAGES = (
    "linux-image-amd64",
    "ovmf",
    "busybox-static",
    "kmod",
    "mount",
    "python3",
    "podman",
    "crun",
    "conmon",
    "cryptsetup-bin",
    "e2fsprogs",
    "wireguard-tools",
    "iproute2",
    "iptables",
    "ca-certificates",
)
#: the kernel command line (upstream's, measured into RTMR2 on TDX)
CMDLINE = (
    "console=ttyS0 init=/init panic=1 net.ifnames=0 biosdevname=0 mce=off oops=panic "
    "pci=noearly pci=nommconf random.trust_cpu=y random.trust_bootloader=n tsc=reliable "
    "no-kvmclock quiet"
)
#: modules of pydstack that make up the tee simulator; a prod rootfs has none of them
SIMULATOR_MODULES = (
    "pydstack/tee/hosttd.py",
    "pydstack/tee/simulated.py",
    "pydstack/tee/mockpki.py",
    "pydstack/tee/collateral.py",
    "pydstack/tee/collateral_server.py",
    "pydstack/guest/simulator.py",
)
#: what the rootfs drops (documentation, caches, the kernel's own initrd)
PRUNE = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log",
    "var/cache/ldconfig/aux-cache",
    "usr/share/ovmf",
    "usr/share/qemu",
)
#: kernel module trees a VM never needs (lib/modules/<kver>/kernel/...)
PRUNE_MODULES = (
    "sound",
    "drivers/gpu",
    "drivers/media",
    "drivers/net/wireless",
    "drivers/net/ethernet",
    "drivers/infiniband",
    "drivers/staging",
    "drivers/bluetooth",
    "net/bluetooth",
    "net/wireless",
    "net/mac80211",
    "drivers/usb",
    "drivers/hid",
    "drivers/isdn",
    "drivers/iio",
    "drivers/scsi",
    "drivers/ata",
    "drivers/mmc",
    "drivers/nfc",
    "drivers/input/touchscreen",
    "drivers/input/joystick",
    "drivers/video",
    "fs/ocfs2",
    "fs/gfs2",
    "fs/xfs",
    "fs/btrfs",
)
CONTAINERS_CONF = """[containers]
log_driver = "k8s-file"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "crun"
"""
UDHCPC_SCRIPT = """#!/bin/sh
# apply a dhcp lease (busybox udhcpc): address, default route, name servers
case "$1" in
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    for r in $router; do ip route replace default via "$r" dev "$interface"; break; done
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done
    ;;
esac
"""
IMAGE_FILES = (
    "metadata.json",
    "bzImage",
    "initramfs.cpio.gz",
    "rootfs.squashfs",
    "ovmf.fd",
    "packages.txt",
)


class ImageBuildError(DstackError):
    """the image could not be built; the message names the step."""


Progress = Callable[[str], None]


def _run(step: str, args: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    try:
        proc = subprocess.run(args, check=False, **kw)  # type: ignore[call-overload]
    except OSError as e:
        raise ImageBuildError(f"{step}: cannot run {args[0]}: {e.strerror}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or b"")[-2000:].decode(errors="replace") if proc.stderr else ""
        raise ImageBuildError(f"{step}: {args[0]} exited with status {proc.returncode} {tail}")
    return proc  # type: ignore[no-any-return]


def checkout_root() -> Path:
    """the source checkout pydstack runs from (the wheel is built from it)."""
    import pydstack

    root = Path(pydstack.__file__).resolve().parents[2]
    if not (root / "pyproject.toml").exists():
        raise ImageBuildError("the image is built from a pydstack checkout; none found")
    return root


def default_cache() -> Path:
    return checkout_root() / ".cache" / "guest-image"


def _rootfs(rootfs: Path, cache: Path, epoch: int, say: Progress) -> None:
    """the Debian rootfs: mmdebstrap's tarball, made once per package list and date (kept in the
    cache: the same inputs then give the same packages), unpacked into `rootfs`."""
    key = hashlib.sha256(f"{SUITE} {epoch} {' '.join(PACKAGES)}".encode()).hexdigest()[:16]
    tarball = cache / f"rootfs-{SUITE}-{key}.tar"
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if not tarball.exists():
        say(f"debootstrapping {SUITE} with mmdebstrap (packages cached in {debs})")
        partial = tarball.with_suffix(".partial")
        _run(
            "rootfs",
            [
                "mmdebstrap",
                "--variant=essential",
                "--mode=root",
                "--format=tar",
                f"--include={','.join(PACKAGES)}",
                "--skip=essential/unlink",
                "--aptopt=APT::Install-Recommends false",
                '--setup-hook=mkdir -p "$1"/var/cache/apt/archives && '
                f'cp -a {debs}/. "$1"/var/cache/apt/archives/',
                f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
                '--customize-hook=rm -f "$1"/var/cache/apt/archives/*.deb',
                SUITE,
                str(partial),
            ],
            env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch)},
            stdin=subprocess.DEVNULL,
        )
        os.replace(partial, tarball)
        for old in cache.glob(f"rootfs-{SUITE}-*.tar"):  # of other package lists or dates
            if old != tarball:
                old.unlink()
    else:
        say(f"unpacking the cached {SUITE} rootfs {tarball.name}")
    rootfs.mkdir(parents=True)
    _run("rootfs", ["tar", "-xf", str(tarball), "--numeric-owner", "-C", str(rootfs)])


def _python(rootfs: Path, cache: Path, flavour: str, say: Progress) -> list[str]:
    """pydstack and its dependencies under /opt/pydstack; returns `name==version` lines."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        say("building the pydstack wheel from this checkout")
        # from a clean copy of the sources: setuptools' build/ in the checkout may hold modules
        # the sources no longer have
        root = checkout_root()
        tree = t / "tree"
        shutil.copytree(
            root / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (root / name).exists():
                shutil.copy(root / name, tree / name)
        _run(
            "wheel",
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(t), str(tree)],
            stderr=subprocess.PIPE,
        )
        wheel = next(t.glob("pydstack-*.whl"))
        frozen = _run(
            "freeze",
            [sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
            stdout=subprocess.PIPE,
        ).stdout.decode()
        pins = [
            line for line in frozen.splitlines() if "==" in line and not line.startswith("pydstack")
        ]
        (t / "constraints.txt").write_text("\n".join(pins) + "\n")
        req = f"pydstack[stack] @ {wheel.as_uri()}"
        # pip takes a wheel of the same name and version in the download directory for the one
        # asked: an earlier build's pydstack would bring its own (stale) dependency list
        for stale in wheels.glob("pydstack-*.whl"):
            stale.unlink()
        say(f"fetching the python dependencies (pinned to this environment, cached in {wheels})")
        _run(
            "wheels",
            [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
             "-c", str(t / "constraints.txt"), "-d", str(wheels), req],
            stderr=subprocess.PIPE,
        )  # fmt: skip
        target = rootfs / "opt" / "pydstack"
        say("installing pydstack into the rootfs")
        _run(
            "install",
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links",
             str(wheels), "--no-compile", "--target", str(target), "-c",
             str(t / "constraints.txt"), req],
            stderr=subprocess.PIPE,
        )  # fmt: skip
    for junk in target.glob("*.dist-info/direct_url.json"):  # names the temporary wheel path
        junk.unlink()
        record = junk.with_name("RECORD")
        lines = record.read_text().splitlines(keepends=True)
        record.write_text(
            "".join(
                x
                for x in lines
                if not x.startswith(f"{junk.parent.name}/")
                or not x.split(",", 1)[0].endswith("/direct_url.json")
            )
        )
    shutil.rmtree(target / "bin", ignore_errors=True)
    if flavour == "prod":
        for rel in SIMULATOR_MODULES:
            (target / rel).unlink(missing_ok=True)
    _run(
        "compile",
        [sys.executable, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode",
         "unchecked-hash", "-d", "/opt/pydstack", str(target)],
    )  # fmt: skip
    pth = rootfs / "usr" / "lib" / "python3" / "dist-packages" / "pydstack.pth"
    pth.write_text("/opt/pydstack\n")
    versions = []
    for info in sorted(target.glob("*.dist-info")):
        name, _, version = info.name.removesuffix(".dist-info").partition("-")
        versions.append(f"python {name} {version}")
    return versions


def _guest_files(rootfs: Path, flavour: str) -> None:
    init = rootfs / "sbin" / "dstack-init"
    init.write_text(
        "#!/usr/bin/python3 -I\n"
        "import sys\n"
        "sys.path.insert(0, '/opt/pydstack')\n"
        "from pydstack.guest.qemu_init import main\n"
        "raise SystemExit(main())\n"
    )
    init.chmod(0o755)
    etc = rootfs / "etc"
    (etc / "dstack").mkdir(exist_ok=True)
    (etc / "dstack" / "image.json").write_text(
        json.dumps({"flavour": flavour, "version": __version__}, sort_keys=True) + "\n"
    )
    (etc / "containers").mkdir(exist_ok=True)
    (etc / "containers" / "containers.conf").write_text(CONTAINERS_CONF)
    (etc / "hostname").write_text("dstack-cvm\n")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost\n")
    lib = rootfs / "usr" / "lib" / "dstack"
    lib.mkdir(parents=True, exist_ok=True)
    (lib / "udhcpc.sh").write_text(UDHCPC_SCRIPT)
    (lib / "udhcpc.sh").chmod(0o755)
    (etc / "resolv.conf").unlink(missing_ok=True)
    (etc / "resolv.conf").write_text("nameserver 10.0.2.3\n")


def _kernel(rootfs: Path) -> tuple[str, Path]:
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageBuildError(f"kernel: expected one kernel in the rootfs, found {len(kernels)}")
    return kernels[0].name.removeprefix("vmlinuz-"), kernels[0]


def _packages(rootfs: Path) -> list[str]:
    out = _run(
        "packages",
        ["dpkg-query", f"--admindir={rootfs}/var/lib/dpkg", "-W",
         "-f", "deb ${Package} ${Version} ${Architecture}\n"],
        stdout=subprocess.PIPE,
    ).stdout.decode()  # fmt: skip
    return sorted(line for line in out.splitlines() if line)


def _normalize(root: Path, epoch: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (epoch, epoch), follow_symlinks=False)
    os.utime(root, (epoch, epoch))


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _replace(path: Path, data: bytes) -> None:
    """write `path` as a new file (a symlink or hard link there is replaced, never written
    through: an image made of links to another must not change that one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def finish_image(out: Path, metadata: dict[str, object], simulated: bool) -> str:
    """write metadata.json, sha256sum.txt, digest.txt (and the simulated measurement) into
    `out`, which holds the other IMAGE_FILES; returns the os_image_hash."""
    _replace(
        out / "metadata.json", (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode()
    )
    lines = "".join(f"{sha256_file(out / n)}  {n}\n" for n in sorted(IMAGE_FILES))
    _replace(out / "sha256sum.txt", lines.encode())
    digest = hashlib.sha256(lines.encode()).hexdigest()
    _replace(out / "digest.txt", (digest + "\n").encode())
    if simulated:
        _replace(out / SIMULATED_MEASUREMENT, simulated_measurement_doc(digest))
    return digest


def build(out: Path, flavour: str, cache: Path, epoch: int, say: Progress) -> str:
    """build the image into `out` (must not exist); returns its os_image_hash."""
    if flavour not in FLAVOURS:
        raise ImageBuildError(f"unknown flavour {flavour!r} ({', '.join(FLAVOURS)})")
    if out.exists():
        raise ImageBuildError(f"{out} already exists")
    missing = [t for t in ("mmdebstrap", "mksquashfs", "dpkg-query") if shutil.which(t) is None]
    if missing:
        raise ImageBuildError(f"missing host tools: {', '.join(missing)}")
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".build-{flavour}-", dir=cache))
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    started = time.monotonic()
    step = [0]

    def progress(text: str) -> None:
        step[0] += 1
        say(f"[{step[0]}/9 {time.monotonic() - started:5.0f}s] {text}")

    try:
        rootfs = work / "rootfs"
        _rootfs(rootfs, cache, epoch, progress)
        wheels = _python(rootfs, cache, flavour, progress)
        progress("writing the guest init and configuration")
        _guest_files(rootfs, flavour)
        kver, kernel = _kernel(rootfs)
        staging.mkdir(parents=True)
        shutil.copyfile(kernel, staging / "bzImage")
        ovmf = rootfs / "usr" / "share" / "ovmf" / "OVMF.fd"
        if not ovmf.exists():
            raise ImageBuildError("firmware: the ovmf package has no OVMF.fd")
        shutil.copyfile(ovmf, staging / "ovmf.fd")
        progress(f"building the initramfs for kernel {kver}")
        try:
            initrd = build_initramfs(rootfs, kver, rootfs / "bin" / "busybox", epoch)
        except InitramfsError as e:
            raise ImageBuildError(f"initramfs: {e}") from e
        (staging / "initramfs.cpio.gz").write_bytes(initrd)
        progress("recording package versions")
        (staging / "packages.txt").write_text("\n".join(_packages(rootfs) + wheels) + "\n")
        for rel in PRUNE:
            p = rootfs / rel
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        for p in (rootfs / "boot").iterdir():
            p.unlink()
        for rel in PRUNE_MODULES:
            shutil.rmtree(rootfs / "lib" / "modules" / kver / "kernel" / rel, ignore_errors=True)
        for name in ("var/log", "var/cache/apt"):
            (rootfs / name).mkdir(parents=True, exist_ok=True)
        _normalize(rootfs, epoch)
        progress("packing the rootfs (squashfs)")
        _run(
            "squashfs",
            ["mksquashfs", str(rootfs), str(staging / "rootfs.squashfs"), "-noappend",
             "-reproducible", "-comp", "zstd", "-Xcompression-level", "3", "-quiet",
             "-no-progress"],
            env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch)},
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        progress("writing metadata, checksums and the os image hash")
        metadata: dict[str, object] = {
            "bios": "ovmf.fd",
            "kernel": "bzImage",
            "initrd": "initramfs.cpio.gz",
            "rootfs": "rootfs.squashfs",
            "cmdline": CMDLINE,
            "version": __version__,
            "git_revision": "",
            "shared_ro": True,
            "is_dev": flavour == "dev",
            "flavour": flavour,
            "kernel_version": kver,
        }
        digest = finish_image(staging, metadata, simulated=flavour == "dev")
        for p in staging.iterdir():
            os.utime(p, (epoch, epoch))
        os.rename(staging, out)
        say(f"[done {time.monotonic() - started:4.0f}s] image {out} ready: os_image_hash {digest}")
        return digest
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)


def build_main(out: Path, flavour: str, cache: Path | None = None) -> str:
    """build with progress on stderr, SOURCE_DATE_EPOCH from the environment (else the fixed
    default), the default cache unless given; returns the os_image_hash."""
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_EPOCH))
    cache = (cache or default_cache()).resolve()
    return build(
        out.resolve(), flavour, cache, epoch, lambda s: print(s, file=sys.stderr, flush=True)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dstack image build", description="build a qemu guest os image from debian packages"
    )
    parser.add_argument("--flavour", choices=FLAVOURS, default="dev")
    parser.add_argument("--out", type=Path, required=True, help="the image directory to create")
    parser.add_argument("--cache", type=Path, default=None, help="download cache")
    args = parser.parse_args(argv)
    try:
        build_main(args.out, args.flavour, args.cache)
    except ImageBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
