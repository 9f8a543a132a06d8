"""end to end on the qemu backend: the sandbox's end-to-end checks, on a real VM.

The guest image is built once from Debian packages (`.cache/guest-image`, reused while the
sources are unchanged); one CVM boots for the whole module, under KVM where it works and TCG
otherwise (as on the CI hosts). Real processes throughout: mock PCCS, dstack-kms, dstack-vmm,
QEMU, the pydstack guest as the VM's init, LUKS2 on the VM's data disk, podman in the VM
pulling the app's image from the stack's registry. Prints the boot time and the VM's idle
memory. Needs root, qemu-system-x86, qemu-utils, socat, mmdebstrap, squashfs-tools.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from pydstack.apps.image import hello_image
from pydstack.attest.errors import VerifyError
from pydstack.attest.eventlog import event_log_from_json, replay_rtmrs
from pydstack.attest.quote import parse_quote
from pydstack.attest.verify import CollateralCache, verify_quote
from pydstack.crypto import k256
from pydstack.devstack import DevStack, free_port
from pydstack.kms.derive import derive_app_keys
from pydstack.kms.keys import KeyStore
from pydstack.mr.image import ImageDir
from pydstack.vmm.backends.qemu.backend import STATE_FILE
from pydstack.vmm.backends.qemu.image_build import finish_image
from pydstack.vmm.backends.qemu.image_cache import cached_image
from pydstack.vmm.backends.qemu.qmp import qmp_command

from .test_vmm_sandbox import compose, dstack, get, port_open, vm_id_of, wait_for, write_app

pytestmark = pytest.mark.integration

#: a bridge and subnet no other test uses (its KMS and registry listen there)
BRIDGE, SUBNET = "dstackqemu0", "10.207.0.0/16"
IMAGE = "pydstack-qemu-dev"
#: a TCG boot on a loaded 2-core host; KVM boots in a fraction of it
BOOT_TIMEOUT = 400


@pytest.fixture(scope="module")
def guest_image() -> Path:
    return cached_image("dev")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, guest_image: Path):
    s = DevStack(
        tmp_path_factory.mktemp("qemu-stack"),
        bridge=BRIDGE,
        subnet=SUBNET,
        backend="qemu",
        qemu_image=guest_image,
        boot_timeout=BOOT_TIMEOUT,
    )
    try:
        s.start()
        yield s
    finally:
        s.stop(remove_bridge=True)


@pytest.fixture(scope="module")
def image(stack: DevStack) -> str:
    return stack.push_image(hello_image())


def deploy(stack: DevStack, d: Path, name: str, *extra: str, image: str = IMAGE, check=True):
    return dstack(
        stack, "deploy", "--name", name, "--image", image, "--compose",
        str(d / "app-compose.json"), "--simulated-tee", "dstack-tdx", "--vcpu", "2",
        "--memory", "1024", "--disk", "2", *extra, check=check,
    )  # fmt: skip


def qemu_pid(stack: DevStack, vm: str) -> int:
    import json

    return int(json.loads((stack.dir / "run" / "vm" / vm / STATE_FILE).read_text())["pid"])


def gone(pid: int) -> bool:
    """the process ended (a QEMU started by a VMM that died is reaped by init, maybe later)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _snapshot(stack: DevStack) -> tuple[list[str], list[str]]:
    run = stack.dir / "run" / "vm"
    vms = [v["id"] for v in stack.rpc("Status", {}).get("vms", [])]
    return sorted(p.name for p in run.iterdir()) if run.exists() else [], sorted(vms)


def test_deploy_keys_quote_env_storage_and_lifecycle(
    stack: DevStack, image: str, guest_image: Path, tmp_path
):
    d = write_app(tmp_path / "app", image)
    app_id, chash = compose(stack, d, "hello")
    stack.allow({app_id: [chash]})
    (d / "env-all").write_text("SECRET=s3cr3t\nFORBIDDEN=leaked\n")
    port = free_port()
    t0 = time.monotonic()
    out = deploy(
        stack, d, "hello", "--env-file", str(d / "env-all"), "--kms-encrypt-url", stack.kms_url,
        "--port", f"tcp:127.0.0.1:{port}:8080",
    ).stdout  # fmt: skip
    vm = vm_id_of(out)
    info = stack.wait_vm(vm, timeout=BOOT_TIMEOUT)
    get(port, "/health")
    boot_s = time.monotonic() - t0
    pid = qemu_pid(stack, vm)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    accel = cmdline[cmdline.index(b"-accel") + 1].decode()
    time.sleep(5)  # idle
    sysinfo = httpx.post(f"{stack.vmm_url}/guest/SysInfo?json", json={"id": vm}, timeout=30).json()
    used = (int(sysinfo["total_memory"]) - int(sysinfo["available_memory"])) >> 20
    print(
        f"\nqemu cvm ({accel}): boot to app running {boot_s:.1f} s; idle memory: {used} MiB used "
        f"in the vm, {rss_mib(pid):.0f} MiB rss of its qemu (1024 MiB vm)"
    )
    instance_id = info["instance_id"]
    assert info["app_id"] == app_id and len(instance_id) == 40
    lsvm = dstack(stack, "lsvm").stdout
    assert vm in lsvm and "running" in lsvm

    g = httpx.post(f"{stack.vmm_url}/guest/Info?json", json={"id": vm}, timeout=30).json()
    assert (g["app_id"], g["instance_id"]) == (app_id, instance_id)
    assert sysinfo["os_name"] == "pydstack-qemu" and int(sysinfo["total_memory"]) > 0

    # GetKey from inside the container equals the KMS derivation
    root = KeyStore(stack.dir / "kms-certs").load()
    expected = derive_app_keys(
        root.root_ca_key, root.root_k256, bytes.fromhex(app_id), bytes.fromhex(instance_id)
    )
    want_key, want_chain = k256.get_key_chain(
        expected.k256_key, "wallet/eth", "signing", "secp256k1", expected.k256_signature
    )
    got = get(port, "/key", path="wallet/eth", purpose="signing")
    assert got["key"] == want_key.hex()
    assert got["signature_chain"] == [s.hex() for s in want_chain]

    # the quote verifies with the mock root, its event log replays to RTMR0-3, and RTMR0-2 (and
    # MRTD) are what the image says it measures
    nonce = os.urandom(32)
    q = get(port, "/quote", report_data=nonce.hex())
    raw = bytes.fromhex(q["quote"])
    root_der = stack.root_ca.read_bytes()
    collateral = asyncio.run(CollateralCache(stack.pccs_url).get(raw, root_ca_der=root_der))
    report = verify_quote(raw, collateral, root_ca_der=root_der).quote.td_report
    assert report is not None and report.report_data[:32] == nonce
    events = event_log_from_json(q["event_log"])
    assert replay_rtmrs(events) == report.rtmrs
    want = ImageDir.open(guest_image).sandbox_measurements()
    assert (report.mr_td, *report.rtmrs[:3]) == (want.mrtd, want.rtmr0, want.rtmr1, want.rtmr2)
    measured = {e.event: e.event_payload for e in events if e.imr == 3}
    assert measured["compose-hash"].hex() == chash
    assert measured["storage-fs"] == b"ext4"
    order = [e.event for e in events if e.imr == 3 and e.event]
    assert order[: order.index("system-ready") + 1][-9:] == [
        "system-preparing", "app-id", "compose-hash", "instance-id", "boot-mr-done",
        "os-image-hash", "key-provider", "storage-fs", "system-ready",
    ]  # fmt: skip
    with pytest.raises(VerifyError):
        verify_quote(raw, collateral)

    # encrypted env: the allowed variable arrives, the other is dropped
    assert get(port, "/env", name="SECRET")["value"] == "s3cr3t"
    assert get(port, "/env", name="FORBIDDEN")["value"] == "unset"
    logs = stack.logs(vm, 400)
    assert "FORBIDDEN is not in allowed_envs" in logs and "leaked" not in logs

    # the data disk: LUKS2 in the vm, ciphertext on the host, kept across stop/start
    r = httpx.post(f"http://127.0.0.1:{port}/data", params={"name": "note"}, content=b"persist me")
    assert r.status_code == 200, r.text
    wd = stack.dir / "run" / "vm" / vm
    # the ACPI power button (QMP system_powerdown, as ShutdownVm uses when the guest API cannot
    # be asked): the guest stops its app, reports it, and powers off; not restarted
    asyncio.run(qmp_command(wd / "qmp.sock", "system_powerdown"))
    wait_for(lambda: stack.info(vm)["status"] == "stopped", "graceful power-off", 120)
    events = [(e["event"], e["body"]) for e in stack.info(vm)["events"]]
    assert ("shutdown.progress", "powering off") in events
    disk = (wd / "hda.img").read_bytes()
    assert b"LUKS\xba\xbe" in disk and b"persist me" not in disk
    assert not port_open(port)
    dstack(stack, "start", vm)
    info = stack.wait_vm(vm, timeout=BOOT_TIMEOUT)
    assert info["instance_id"] == instance_id
    assert get(port, "/key", path="wallet/eth", purpose="signing")["key"] == want_key.hex()
    assert get(port, "/data", name="note")["value"] == "persist me"

    # the VMM dies and comes back: the CVM kept running and is still manageable
    stack.procs["vmm"].kill()
    assert get(port, "/health") == {"ok": True}
    stack.start_vmm()
    info = stack.info(vm)
    assert info["status"] == "running" and info["boot_progress"] == "done"
    q2 = get(port, "/quote", report_data=nonce.hex())
    again = parse_quote(bytes.fromhex(q2["quote"])).td_report
    assert again is not None and again.rtmrs == report.rtmrs

    # ACPI power-down through QMP when the guest API is not asked: a forced stop is a kill
    pid = qemu_pid(stack, vm)
    dstack(stack, "stop", "-f", vm)
    wait_for(lambda: stack.info(vm)["status"] == "stopped", "forced stop")
    assert gone(pid) and not port_open(port)

    # remove deletes everything
    dstack(stack, "remove", vm)
    wait_for(lambda: not wd.exists(), "work dir removal")
    assert vm not in dstack(stack, "lsvm").stdout


def _broken_image(good: Path, where: Path, file: str, data: bytes) -> Path:
    """a consistent image (checksums match) whose `file` is `data`, the rest linked to `good`."""
    where.mkdir(parents=True)
    for p in good.iterdir():
        if p.name not in ("sha256sum.txt", "digest.txt", "metadata.json", file):
            (where / p.name).symlink_to(p)
    (where / file).write_bytes(data)
    import json

    finish_image(where, json.loads((good / "metadata.json").read_text()), True)
    return where


def _mid_boot(stack: DevStack, vm: str) -> bool:
    """the guest's boot has begun its own steps: one reported to the VMM, or printed on the
    console (the kill below needs the guest running, not the host API; the first test checks
    that every step reaches the VMM)."""
    if stack.info(vm).get("boot_progress") not in ("", "booting"):
        return True
    return "[boot.progress]" in stack.logs(vm, 400)


def _seen(stack: DevStack, vm: str) -> str:
    """what a timed-out wait saw: the vm's info and the ends of its serial log and the vmm log."""
    vmm_log = "\n".join((stack.dir / "vmm.log").read_text(errors="replace").splitlines()[-40:])
    return f"info: {stack.info(vm)}\nserial log:\n{stack.logs(vm, 80)}\nvmm log:\n{vmm_log}"


def test_bad_images_and_a_dying_vm_give_clear_errors(
    stack: DevStack, image: str, guest_image: Path, tmp_path
):
    d = write_app(tmp_path / "bad", image)
    compose(stack, d, "bad", kms=False)
    images = stack.dir / "images"
    before = _snapshot(stack)

    def refused(out: subprocess.CompletedProcess[str], message: str) -> None:
        assert out.returncode != 0, out.stdout
        assert message in out.stderr, out.stderr
        assert _snapshot(stack) == before

    refused(deploy(stack, d, "x1", image="no-such-image", check=False), "not found")
    # a corrupt image (a file that does not match its checksum) never boots
    corrupt = images / "corrupt"
    shutil.copytree(guest_image, corrupt, symlinks=True, copy_function=os.link)
    (corrupt / "bzImage").unlink()
    (corrupt / "bzImage").write_bytes(b"not a kernel")
    refused(deploy(stack, d, "x2", image="corrupt", check=False), "corrupt: bzImage")
    # a kernel QEMU cannot load: QEMU's own words, nothing left
    _broken_image(guest_image, images / "nokernel", "bzImage", b"\0" * 4096)
    refused(deploy(stack, d, "x3", image="nokernel", check=False), "qemu exited at start")

    # a kernel that cannot boot (no usable initramfs): the vm exits, its serial log says why
    _broken_image(guest_image, images / "noinit", "initramfs.cpio.gz", b"\0" * 4096)
    vm = vm_id_of(deploy(stack, d, "x4", image="noinit").stdout)
    wait_for(
        lambda: stack.info(vm).get("status") == "exited",
        "the broken kernel to halt",
        300,
        lambda: _seen(stack, vm),
    )
    assert "the cvm exited during boot" in stack.info(vm)["boot_error"]
    assert "boot error" in dstack(stack, "lsvm").stdout
    assert "Kernel panic" in stack.logs(vm, 200)
    dstack(stack, "remove", vm)

    # QEMU killed in the middle of a boot: a boot error, and nothing of it keeps running
    vm = vm_id_of(deploy(stack, d, "x5").stdout)
    t0 = time.monotonic()
    wait_for(lambda: _mid_boot(stack, vm), "the boot", 300, lambda: _seen(stack, vm))
    print(f"x5: first boot step after {time.monotonic() - t0:.1f} s")
    pid = qemu_pid(stack, vm)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: stack.info(vm).get("status") == "exited", "the vm to be seen exited")
    assert "the cvm exited during boot" in stack.info(vm)["boot_error"]
    dstack(stack, "remove", vm)
    wait_for(lambda: not (stack.dir / "run" / "vm" / vm).exists(), "the removal")
    for name in ("corrupt", "nokernel", "noinit"):
        shutil.rmtree(images / name)
