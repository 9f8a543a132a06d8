"""the qemu backend without booting anything: its command lines next to upstream's for the same
VM configuration, its deliberate differences on this host, image checks, the refusal of TDX on a
host without it, and what a start that fails leaves (nothing)."""

from __future__ import annotations

import gzip
import json
import os
import stat
from pathlib import Path

import pytest

from pydstack.errors import ConfigError
from pydstack.guest.boot import BootError
from pydstack.guest.luks import check_header
from pydstack.mr.image import SIMULATED_KIND, ImageDir
from pydstack.vmm.admission import Admission
from pydstack.vmm.backends.qemu.backend import QemuBackend
from pydstack.vmm.backends.qemu.cmdline import Nic, QemuLaunch, mac_address, qemu_command
from pydstack.vmm.backends.qemu.config import QemuConfig
from pydstack.vmm.backends.qemu.image_build import IMAGE_FILES, finish_image
from pydstack.vmm.backends.qemu.initramfs import (
    InitramfsError,
    build_initramfs,
    module_files,
    parse_modules_dep,
)
from pydstack.vmm.compose import PortMapping
from pydstack.vmm.errors import BackendError, Unsupported
from pydstack.vmm.images import load_images
from pydstack.vmm.runtime import VmRuntime
from pydstack.vmm.vm import Vm
from pydstack.vmm.workdir import VmManifest, VmWorkDir

from .fakes import CAPS, FakeBackend, vmm_config

WD = Path("/var/lib/dstack/vm/3b1f")
IMG = Path("/var/lib/dstack/images/dstack-0.5.4")


def upstream_like(**kw: object) -> QemuLaunch:
    """the launch upstream's VMM makes for: 2 vcpu, 2048 MB, a user NIC with one port mapping,
    the image's firmware/kernel/initrd/rootfs, 9p host share read-only, vsock cid 1000, QMP."""
    base: dict[str, object] = {
        "qemu": "qemu-system-x86_64",
        "workdir": WD,
        "vm_id": "vm-123",
        "bios": IMG / "ovmf.fd",
        "kernel": IMG / "bzImage",
        "initrd": IMG / "initramfs.cpio.gz",
        "rootfs": IMG / "rootfs.img.verity",
        "cmdline": "console=ttyS0 init=/init panic=1",
        "vcpu": 2,
        "memory_mb": 2048,
        "ports": (PortMapping("tcp", "127.0.0.1", 8080, 80),),
        "vsock_cid": 1000,
        "no_reboot": False,
    }
    return QemuLaunch(**{**base, **kw})  # type: ignore[arg-type]


#: upstream dstack-vmm's argv (qemu.rs, `QemuCommandBuilder::build`) for that VM, no TEE
UPSTREAM_NO_TEE = [
    "qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-nographic", "-nodefaults",
    "-chardev", f"pty,id=com0,path={WD}/serial.pty,logfile={WD}/serial.log,logappend=on",
    "-serial", "chardev:com0",
    "-qmp", f"unix:{WD}/qmp.sock,server,wait=off",
    "-bios", f"{IMG}/ovmf.fd", "-kernel", f"{IMG}/bzImage", "-initrd", f"{IMG}/initramfs.cpio.gz",
    "-drive", f"file={IMG}/rootfs.img.verity,if=none,id=hd0,format=raw,readonly=on",
    "-device", "virtio-blk-pci,drive=hd0",
    "-drive", f"file={WD}/hda.img,if=none,id=hd1", "-device", "virtio-blk-pci,drive=hd1",
    "-netdev",
    "user,id=net0,net=10.0.2.0/24,dhcpstart=10.0.2.10,restrict=no,hostfwd=tcp:127.0.0.1:8080-:80",
    "-device", "virtio-net-pci,netdev=net0,mac=96:b1:d8:b9:08:e6",
    "-smbios", "type=1,manufacturer=dstack,product=dstack",
    "-device", "vhost-vsock-pci,guest-cid=1000",
    "-virtfs",
    f"local,path={WD}/shared,mount_tag=host-shared,readonly=on,security_model=mapped,id=virtfs0",
    "-machine", "q35,kernel-irqchip=split,hpet=off",
    "-smp", "2", "-m", "2048M", "-append", "console=ttyS0 init=/init panic=1",
]  # fmt: skip


def test_command_line_is_upstreams_for_the_same_vm() -> None:
    assert qemu_command(upstream_like()) == UPSTREAM_NO_TEE


def test_tdx_machine_and_guest_object_are_upstreams() -> None:
    argv = qemu_command(upstream_like(tdx=True, mrconfigid="AQID", qgs_port=4050))
    i = argv.index("-machine")
    assert argv[i : i + 4] == [
        "-machine",
        "q35,kernel-irqchip=split,confidential-guest-support=tdx,hpet=off",
        "-object",
        '{"qom-type":"tdx-guest","id":"tdx","mrconfigid":"AQID",'
        '"quote-generation-socket":{"type":"vsock","cid":"2","port":"4050"}}',
    ]
    # everything else is the no-TEE command line
    assert argv[:i] + argv[i + 4 :] == UPSTREAM_NO_TEE[:i] + UPSTREAM_NO_TEE[i + 2 :]
    plain = qemu_command(upstream_like(tdx=True))
    assert plain[plain.index("-object") + 1] == '{"qom-type":"tdx-guest","id":"tdx"}'


def test_mac_addresses_are_upstreams() -> None:
    assert mac_address("vm-123", 0) == "96:b1:d8:b9:08:e6"
    assert mac_address("vm-123", 1) == "c6:74:2c:65:14:b9"


def test_this_hosts_differences_are_only_the_documented_ones() -> None:
    sock = WD / "host-api" / "api.sock"
    argv = qemu_command(
        upstream_like(
            accel="tcg",
            vsock_cid=None,
            no_reboot=True,
            host_api_socket=sock,
            guest_api_forward=(41000, 60001),
        )
    )
    assert argv[1:7] == ["-accel", "tcg", "-cpu", "max", "-nographic", "-nodefaults"]
    assert argv[7] == "-no-reboot"
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev.startswith(UPSTREAM_NO_TEE[UPSTREAM_NO_TEE.index("-netdev") + 1])
    # the guest api: loopback only; the host api: this vm's own socket, nothing shared
    assert ",hostfwd=tcp:127.0.0.1:41000-:60001," in netdev
    assert netdev.endswith(f",guestfwd=tcp:10.0.2.100:8000-cmd:socat STDIO UNIX-CONNECT:{sock}")
    assert "vhost-vsock-pci" not in " ".join(argv)
    rest = [a for a in argv if a not in ("-no-reboot",)]
    expected = list(UPSTREAM_NO_TEE)
    vsock = expected.index("vhost-vsock-pci,guest-cid=1000")
    del expected[vsock - 1 : vsock + 1]
    expected[2], expected[4] = "tcg", "max"
    netdev_at = expected.index("-netdev") + 1
    expected[netdev_at] = netdev
    assert rest == expected


def test_vvfat_share_bridge_nic_and_bad_values() -> None:
    argv = qemu_command(upstream_like(host_share_mode="vvfat", nics=(Nic("bridge", "br0"),)))
    assert f"driver=vvfat,node-name=vvfat0,read-only=on,dir={WD}/shared,label=DSTACKSHR" in argv
    assert "bridge,id=net0,br=br0" in argv
    with pytest.raises(ValueError, match="comma"):
        qemu_command(upstream_like(workdir=Path("/tmp/a,b")))
    with pytest.raises(ValueError, match="not supported"):
        qemu_command(upstream_like(host_share_mode="vhd"))


def test_config_defaults_and_qemu_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = QemuConfig.from_table({})
    assert (cfg.accel, cfg.host_share_mode, cfg.networking_mode) == ("auto", "9p", "user")
    assert QemuConfig(qemu_path="/opt/qemu/bin/qemu").qemu() == "/opt/qemu/bin/qemu"
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="not installed"):
        cfg.qemu()
    with pytest.raises(ConfigError, match="comma"):
        QemuConfig.from_table({"product_name": "a,b"})


# ------------------------------------------------------------------ admission
def test_a_tdx_request_on_a_host_without_tdx_is_refused(tmp_path: Path) -> None:
    from dataclasses import replace

    caps = replace(CAPS, simulate_tee_requests=False)
    adm = Admission(vmm_config(tmp_path), FakeBackend(caps), {})
    with pytest.raises(Unsupported, match=r"no tdx .*--simulated-tee dstack-tdx"):
        adm.tee(False, None)
    assert adm.tee(True, None) == (True, None)
    assert adm.tee(False, "dstack-tdx") == (True, "dstack-tdx")
    # the sandbox keeps standing in with its simulated td
    assert Admission(vmm_config(tmp_path), FakeBackend(), {}).tee(False, None) == (
        True,
        "dstack-tdx",
    )


# ------------------------------------------------------------------ images
def make_image(d: Path, simulated: bool = True) -> str:
    d.mkdir(parents=True)
    for name in IMAGE_FILES:
        if name != "metadata.json":
            (d / name).write_bytes(f"{name} bytes".encode())
    meta = {
        "bios": "ovmf.fd",
        "kernel": "bzImage",
        "initrd": "initramfs.cpio.gz",
        "rootfs": "rootfs.squashfs",
        "cmdline": "console=ttyS0",
        "version": "0.0.1",
        "is_dev": simulated,
    }
    return finish_image(d, meta, simulated=simulated)


def test_built_image_is_listed_and_measured_as_the_simulated_td(tmp_path: Path) -> None:
    digest = make_image(tmp_path / "images" / "dev")
    assert digest == (tmp_path / "images" / "dev" / "digest.txt").read_text().strip()
    # the qemu backend lists images of upstream's layout (no `kind`), the sandbox's are not
    assert list(load_images(tmp_path / "images", ("tdx",))) == ["dev"]
    assert list(load_images(tmp_path / "images", ("sandbox",))) == []
    img = ImageDir.open(tmp_path / "images" / "dev")
    assert img.kind == SIMULATED_KIND and img.identity.hex() == digest
    from pydstack.tee.simulated import synthetic_measurements

    got = img.sandbox_measurements()
    assert (got.mrtd, got.rtmr0, got.rtmr1, got.rtmr2) == synthetic_measurements(digest)
    # a prod image ships no simulated measurement: only dstack-mr could measure it
    make_image(tmp_path / "images" / "prod", simulated=False)
    assert ImageDir.open(tmp_path / "images" / "prod").kind == "tdx"


def backend(tmp_path: Path, qemu: str = "qemu-system-x86_64") -> QemuBackend:
    cfg = QemuConfig(qemu_path=qemu, accel="tcg", tdx="off", min_free_memory_mb=0)
    return QemuBackend(vmm_config(tmp_path), cfg)


def test_a_corrupt_image_is_refused_before_anything_runs(tmp_path: Path) -> None:
    make_image(tmp_path / "images" / "dev")
    b = backend(tmp_path)
    image = load_images(tmp_path / "images", ("tdx",))["dev"]
    b.verify_image(image)
    (image.path / "bzImage").write_bytes(b"flipped")
    with pytest.raises(BackendError, match="corrupt: bzImage does not match"):
        b.verify_image(image)
    (image.path / "bzImage").unlink()
    with pytest.raises(BackendError, match="missing bzImage"):
        b.verify_image(image)


def _vm(tmp_path: Path) -> Vm:
    m = VmManifest(id="vm-1", name="a", app_id="00" * 20, image="dev", disk_size=1)
    wd = VmWorkDir.create(tmp_path / "run", m, {"app-compose.json": b"{}"})
    vm = Vm(wd, m, VmRuntime(wd))
    return vm


async def test_qemu_that_refuses_to_start_leaves_nothing_running(tmp_path: Path) -> None:
    from pydstack.vmm.backends import BootSpec

    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho 'qemu: could not load kernel bzImage' >&2\nexit 1\n")
    fake.chmod(0o755)
    (tmp_path / "run").mkdir()
    make_image(tmp_path / "images" / "dev")
    image = load_images(tmp_path / "images", ("tdx",))["dev"]
    b = backend(tmp_path, str(fake))
    vm = _vm(tmp_path)
    b.attach(vm)
    spec = BootSpec(image=image, hostname="a", vcpu=1, memory_mb=256, no_tee=True,
                    stdout_log=vm.workdir.path / "stdout.log")  # fmt: skip
    with pytest.raises(BackendError, match="qemu exited at start: qemu: could not load kernel"):
        await b.launch(vm, spec)
    assert not b.is_alive(vm) and b.guest_api_address(vm) is None
    # the data disk was made (it is the vm's, kept for its next start), qcow2 of its size
    assert (vm.workdir.path / "hda.img").read_bytes()[:4] == b"QFI\xfb"


# ------------------------------------------------------------------ guest pieces
def test_initramfs_is_deterministic_and_loads_dependencies_first(tmp_path: Path) -> None:
    kver = "6.1.0-test"
    mods = tmp_path / "lib" / "modules" / kver
    (mods / "kernel").mkdir(parents=True)
    for name in ("virtio_blk", "squashfs", "overlay", "virtio_ring", "zstd_decompress"):
        (mods / "kernel" / f"{name}.ko").write_bytes(name.encode())
    (mods / "modules.dep").write_text(
        "kernel/virtio_blk.ko: kernel/virtio_ring.ko\n"
        "kernel/squashfs.ko: kernel/zstd_decompress.ko\n"
        "kernel/overlay.ko:\nkernel/virtio_ring.ko:\nkernel/zstd_decompress.ko:\n"
    )
    (mods / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    order = module_files(tmp_path, kver, parse_modules_dep((mods / "modules.dep").read_text()))
    assert order == [
        "kernel/virtio_ring.ko",
        "kernel/virtio_blk.ko",
        "kernel/zstd_decompress.ko",
        "kernel/squashfs.ko",
        "kernel/overlay.ko",
    ]
    bb = tmp_path / "busybox"
    bb.write_bytes(b"\x7fELF busybox")
    one = build_initramfs(tmp_path, kver, bb, 1767225600)
    assert one == build_initramfs(tmp_path, kver, bb, 1767225600)
    raw = gzip.decompress(one)
    assert raw.startswith(b"070701") and b"modules.order" in raw and b"switch_root" in raw
    (mods / "kernel" / "overlay.ko").unlink()
    (mods / "modules.dep").write_text("kernel/virtio_blk.ko:\nkernel/squashfs.ko:\n")
    with pytest.raises(InitramfsError, match="overlay is neither built in"):
        build_initramfs(tmp_path, kver, bb, 0)
    assert stat.S_ISREG(bb.stat().st_mode)


def test_a_luks_header_with_another_cipher_is_refused() -> None:
    good = {
        "keyslots": {"0": {"area": {"encryption": "aes-xts-plain64"}}},
        "segments": {"0": {"encryption": "aes-xts-plain64"}},
    }
    check_header(json.dumps(good))
    bad = {**good, "segments": {"0": {"encryption": "cipher_null-ecb"}}}
    with pytest.raises(BootError, match="cipher other than aes-xts-plain64"):
        check_header(json.dumps(bad))
    with pytest.raises(BootError, match="malformed"):
        check_header("{not json")
    with pytest.raises(BootError):
        check_header(json.dumps({"keyslots": {}, "segments": {}}))


# ------------------------------------------------------------------ the vmm around it
COMPOSE = json.dumps(
    {
        "name": "a",
        "runner": "docker-compose",
        "docker_compose_file": "services:\n  w:\n    image: i\n",
    }
)


async def test_a_cvm_that_exits_during_boot_gets_a_boot_error_naming_why(make_app) -> None:
    from pydstack.rpc.proto import vmm_rpc_pb2 as pb

    from .fakes import IMAGE

    backend = FakeBackend()
    app = await make_app(backend)
    req = pb.VmConfiguration(name="a", image=IMAGE, compose_file=COMPOSE)
    vm_id = await app.create_vm(req)
    vm = app.get(vm_id)
    vm.runtime.notify("boot.progress", "requesting app keys")
    backend.exit_details[vm_id] = "qemu: terminating on signal 9"
    backend.crash(vm_id)
    info = app.vm_info(vm)
    assert info.status == "exited"
    assert info.boot_error == (
        "the cvm exited during boot (at 'requesting app keys'): qemu: terminating on signal 9"
    )
    # a booted cvm that stops, or one stopped on request, is no boot error
    await app.start_vm(vm_id)
    vm.runtime.notify("boot.progress", "done")
    backend.crash(vm_id)
    assert app.vm_info(vm).boot_error == ""
    await app.start_vm(vm_id)
    await app.stop_vm(vm_id)
    assert app.vm_info(vm).boot_error == ""


async def test_a_boot_past_the_timeout_is_an_error_and_the_cvm_is_stopped(make_app) -> None:
    from dataclasses import replace

    from pydstack.rpc.proto import vmm_rpc_pb2 as pb

    from .fakes import IMAGE, FakeClock

    clock = FakeClock()
    backend = FakeBackend(replace(CAPS, boot_timeout=120))
    app = await make_app(backend, clock)
    vm_id = await app.create_vm(pb.VmConfiguration(name="a", image=IMAGE, compose_file=COMPOSE))
    vm = app.get(vm_id)
    vm.runtime.notify("boot.progress", "requesting app keys")
    clock.now += 119
    await app.check_boot_timeouts()
    assert backend.is_alive(vm) and not vm.runtime.boot_error
    clock.now += 2
    await app.check_boot_timeouts()
    assert not backend.is_alive(vm) and backend.stops[-1] == (vm_id, 0.0)
    assert vm.runtime.boot_error.startswith("the cvm did not boot in 120 s (at 'requesting")
    # a boot that finished is left alone however long it runs
    await app.start_vm(vm_id)
    vm.runtime.notify("boot.progress", "done")
    clock.now += 10_000
    await app.check_boot_timeouts()
    assert backend.is_alive(vm)


def test_a_full_disk_is_a_clear_error_and_leaves_no_disk(tmp_path: Path, monkeypatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "qemu-img"
    fake.write_text(
        "#!/bin/sh\nfor a; do last=$a; done\n"
        'echo x > "$5"\necho "qemu-img: $5: No space left on device" >&2\nexit 1\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    (tmp_path / "run").mkdir()
    b = backend(tmp_path)
    vm = _vm(tmp_path)
    with pytest.raises(BackendError, match=r"cannot create the data disk: .*No space left"):
        b._data_disk(vm)
    assert sorted(p.name for p in vm.workdir.path.iterdir() if "hda" in p.name) == []


def test_the_guest_uses_the_hosts_td_only_on_a_dev_image_asked_to(monkeypatch) -> None:
    from pydstack.guest import qemu as guest
    from pydstack.tee import real
    from pydstack.tee.hosttd import HostTdx
    from pydstack.types.sysconfig import SysConfig

    monkeypatch.setattr(real, "tdx_available", lambda: False)
    asked = SysConfig(host_api_url="http://10.0.2.100:8000/api", simulated_tee="dstack-tdx")
    monkeypatch.setattr(guest, "image_flavour", lambda: "dev")
    tdx = guest.find_tdx(asked)
    assert isinstance(tdx, HostTdx) and tdx._http == ("10.0.2.100", 8000)
    with pytest.raises(BootError, match="asked for no simulated tee"):
        guest.find_tdx(SysConfig(host_api_url="http://10.0.2.100:8000/api"))
    monkeypatch.setattr(guest, "image_flavour", lambda: "prod")
    with pytest.raises(BootError, match="a prod image has no tee simulator"):
        guest.find_tdx(asked)


def test_a_prod_image_drops_every_simulator_module() -> None:
    from pydstack.vmm.backends.qemu.image_build import SIMULATOR_MODULES, checkout_root

    src = checkout_root() / "src"
    assert all((src / m).is_file() for m in SIMULATOR_MODULES)  # the names are still right
    assert "pydstack/tee/hosttd.py" in SIMULATOR_MODULES


async def test_a_bridge_only_vm_is_refused_for_want_of_a_host_api_channel(tmp_path: Path) -> None:
    from pydstack.vmm.backends import BootSpec
    from pydstack.vmm.workdir import NetworkSpec

    (tmp_path / "run").mkdir()
    make_image(tmp_path / "images" / "dev")
    image = load_images(tmp_path / "images", ("tdx",))["dev"]
    b = backend(tmp_path)
    vm = _vm(tmp_path)
    b.attach(vm)
    spec = BootSpec(image=image, hostname="a", vcpu=1, memory_mb=256,
                    networks=(NetworkSpec("bridge", "br0"),))  # fmt: skip
    with pytest.raises(BackendError, match="no host-api channel"):
        b.launch_spec(vm, spec, 41000)
    user = b.launch_spec(vm, BootSpec(image=image, hostname="a", vcpu=1, memory_mb=256), 41000)
    assert user.nics[0].mode == "user" and user.host_api_socket is not None


def test_the_data_disk_is_made_once_and_grown_by_a_resize(tmp_path: Path) -> None:
    import subprocess

    (tmp_path / "run").mkdir()
    b = backend(tmp_path)
    vm = _vm(tmp_path)
    hda = vm.workdir.path / "hda.img"

    def size() -> int:
        out = subprocess.run(
            ["qemu-img", "info", "--output", "json", str(hda)], capture_output=True, check=True
        ).stdout
        return int(json.loads(out)["virtual-size"])

    b._data_disk(vm)
    assert size() == 1 << 30
    vm.manifest.disk_size = 3  # ResizeVm of the stopped vm
    b._data_disk(vm)
    assert size() == 3 << 30
    b._data_disk(vm)  # nothing to do: never shrunk, never recreated
    assert size() == 3 << 30


def test_finishing_an_image_of_links_never_writes_through_them(tmp_path):
    """an image made of symlinks to another (as the qemu test's broken images are) gets files
    of its own; the image it links to keeps its checksums and measurement."""
    from pydstack.mr.image import SIMULATED_MEASUREMENT
    from pydstack.vmm.backends.qemu.image_build import IMAGE_FILES, finish_image

    good, other = tmp_path / "good", tmp_path / "other"
    good.mkdir()
    other.mkdir()
    for name in IMAGE_FILES:
        (good / name).write_bytes(name.encode())
    meta = {"bios": "OVMF.fd", "kernel": "bzImage", "initrd": "initramfs.cpio.gz", "cmdline": ""}
    finish_image(good, meta, True)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    for p in good.iterdir():
        (other / p.name).symlink_to(p)
    (other / "bzImage").unlink()
    (other / "bzImage").write_bytes(b"another kernel")
    finish_image(other, meta, True)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert (other / SIMULATED_MEASUREMENT).read_bytes() != before[SIMULATED_MEASUREMENT]
    assert not (other / SIMULATED_MEASUREMENT).is_symlink()


# ------------------------------------------------------------------ a kvm that cannot run guests
FAKE_QEMU = '''#!{python}
"""a stand-in QEMU: its QMP answers `internal-error` under -accel kvm (as kvm-pvm does with OVMF),
`running` under tcg; it prints QEMU's internal-error line and then registers, as QEMU does."""
import os, socket, sys, json, time
argv = sys.argv
accel = argv[argv.index("-accel") + 1]
with open(os.environ["FAKE_QEMU_LOG"], "a") as f:
    f.write(accel + "\\n")
if "isa-debug-exit,iobase=0xf4,iosize=0x01" in argv:  # the probe
    if accel == "kvm":
        sys.stderr.write("KVM internal error. Suberror: 1\\nEAX=00000000\\n")
        sys.stderr.flush()
        time.sleep(60)
    sys.exit(3)
qmp = next(a for a in argv if a.startswith("unix:") and "qmp.sock" in a)[5:].split(",")[0]
if accel == "kvm":
    print("KVM internal error. Suberror: 1\\nemulation failure\\nRAX=0 RBX=0", flush=True)
srv = socket.socket(socket.AF_UNIX)
srv.bind(qmp)
srv.listen()
while True:
    c, _ = srv.accept()
    f = c.makefile("rwb")
    f.write(b'{{"QMP": {{}}}}\\n'); f.flush()
    for line in f:
        cmd = json.loads(line)["execute"]
        if cmd == "query-status":
            st = "internal-error" if accel == "kvm" else "running"
            ret = {{"status": st, "running": st == "running"}}
        else:
            ret = {{}}
        f.write(json.dumps({{"return": ret}}).encode() + b"\\n"); f.flush()
    c.close()
'''


def _fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    import sys

    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text(FAKE_QEMU.format(python=sys.executable))
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    monkeypatch.setenv("FAKE_QEMU_LOG", str(calls))
    return fake, calls


def test_the_kvm_probe_runs_its_firmware_to_the_exit_port_and_stops_at_an_internal_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from pydstack.vmm.backends.qemu.backend import probe_accel

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    # the probe's instructions are right: TCG runs them to the debug-exit port
    assert probe_accel("qemu-system-x86_64", "tcg")
    # a KVM that stops the guest with an internal error fails the probe, at once (no timeout)
    fake, calls = _fake_qemu(tmp_path, monkeypatch)
    assert not probe_accel(str(fake), "kvm", timeout=300)
    assert probe_accel(str(fake), "tcg")
    assert calls.read_text().split() == ["kvm", "tcg"]


async def test_a_kvm_internal_error_at_start_falls_back_to_tcg_when_accel_is_auto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydstack.vmm.backends import BootSpec

    fake, calls = _fake_qemu(tmp_path, monkeypatch)
    (tmp_path / "run").mkdir()
    make_image(tmp_path / "images" / "dev")
    image = load_images(tmp_path / "images", ("tdx",))["dev"]

    def spec(vm: Vm) -> BootSpec:
        return BootSpec(image=image, hostname="a", vcpu=1, memory_mb=256, no_tee=True,
                        stdout_log=vm.workdir.path / "stdout.log")  # fmt: skip

    # accel = "kvm" (set by the operator): a clear error naming QEMU's line, nothing left running
    cfg = QemuConfig(qemu_path=str(fake), accel="kvm", tdx="off", min_free_memory_mb=0)
    b = QemuBackend(vmm_config(tmp_path), cfg)
    vm = _vm(tmp_path)
    b.attach(vm)
    with pytest.raises(BackendError, match=r"internal error .*KVM internal error\. Suberror: 1"):
        await b.launch(vm, spec(vm))
    assert not b.is_alive(vm)
    # accel = "auto" whose probe passed: the vm starts again under tcg, and so do later ones
    cfg = QemuConfig(qemu_path=str(fake), accel="auto", tdx="off", min_free_memory_mb=0)
    b = QemuBackend(vmm_config(tmp_path), cfg)
    b.accel = "kvm"
    b.attach(vm)
    try:
        await b.launch(vm, spec(vm))
        assert b.is_alive(vm) and b.accel == "tcg"
        state = json.loads((vm.workdir.path / "qemu.json").read_text())
        assert state["accel"] == "tcg" and state["command"][2] == "tcg"
    finally:
        await b.stop(vm, 0)
    assert calls.read_text().split() == ["kvm", "kvm", "tcg"]
