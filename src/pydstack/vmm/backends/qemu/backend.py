"""the qemu backend: each CVM a QEMU process booting a guest image in upstream's layout.

Per VM it keeps `qemu.json` in its directory (the QEMU pid, its guest-API port, the accelerator
it runs under), so a VMM that restarts finds a running QEMU again (by pid and command line) and
the CVM keeps running. The data disk is `hda.img` (qcow2, created on the first boot, grown by a
resize), the console `serial.log`, QEMU's own output `stdout.log`, its monitor `qmp.sock`.

The host: `-accel kvm` when /dev/kvm runs a guest (probed once, at VMM start, with the early
instructions of a firmware), else TCG with a warning; with `accel = "auto"`, a VM that KVM still
stops with an internal error is started again under TCG, and so are the VMs after it. TDX only
where the host's kvm_intel has it, so a request for TDX elsewhere is refused; the simulated TD
(the VMM's) stands in only when a deploy asks for it (`simulated_tee`). Without vsock here, each
CVM's host-API channel is a `guestfwd` on its own user-mode network to its own socket (a
connection on it can only come from that VM), and its guest API a loopback `hostfwd`.

Errors: BackendError when QEMU cannot be started (a missing or corrupt image file, a full disk,
QEMU refusing its arguments), naming why; nothing of that start is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydstack.errors import ConfigError
from pydstack.types import hostshare as hs
from pydstack.vmm.config import VmmConfig
from pydstack.vmm.errors import BackendError, Refused
from pydstack.vmm.images import Image
from pydstack.vmm.vm import Vm
from pydstack.vmm.workdir import atomic_write

from ..base import BootSpec, Capabilities, GpuDevice, HostApiChannel, InterfaceStatus, ProcessInfo
from .cmdline import (
    HOST_API_GUEST_ADDR,
    HOST_API_GUEST_PORT,
    Nic,
    QemuLaunch,
    mac_address,
    mr_config_id_b64,
    qemu_command,
)
from .config import QemuConfig
from .qmp import QmpError, qmp_command

log = logging.getLogger("dstack-vmm")

#: images of upstream's layout (a metadata.json without `kind`)
IMAGE_KIND = "tdx"
STATE_FILE = "qemu.json"
GUEST_API_PORT = 60001
TDX_PARAM = Path("/sys/module/kvm_intel/parameters/tdx")
REQUIRED_TOOLS = ("qemu-img", "socat")
#: how long a start waits for QEMU to run its machine before calling it failed
START_TIMEOUT = 20.0


#: what QEMU prints when KVM stops a guest it cannot run (QMP status `internal-error`)
KVM_INTERNAL_ERROR = b"KVM internal error"
#: the probe's firmware: the reset vector jumps to F000:0000, which runs instructions a
#: firmware runs early (cpuid, the x87 fninit/fwait OVMF's SEC phase executes, rdtsc) and then
#: writes 1 to QEMU's debug-exit port, so QEMU exits with status 3
_PROBE_CODE = bytes.fromhex("6631c00fa2dbe39b0f31b001e6f4f4")
_PROBE_RESET = bytes.fromhex("ea000000f0")  # jmp far f000:0000


def kvm_works(qemu: str, timeout: float = 20.0) -> bool:
    """whether KVM runs a guest here. Nested KVM often opens and then fails: a paravirtual
    host module (kvm-pvm) runs a real-mode `out` but stops OVMF at its first x87 instruction
    with an internal error. So KVM works only if it runs the probe firmware to its end."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    return probe_accel(qemu, "kvm", timeout)


def probe_accel(qemu: str, accel: str, timeout: float = 20.0) -> bool:
    """whether `accel` runs a 64 KiB firmware of the instructions a firmware runs early
    through to QEMU's debug-exit port; an internal error on QEMU's stderr ends the probe at
    once (QEMU would pause, not exit)."""
    bios = bytearray(b"\xf4" * 65536)
    bios[: len(_PROBE_CODE)] = _PROBE_CODE
    bios[-16 : -16 + len(_PROBE_RESET)] = _PROBE_RESET
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(bios)
        f.flush()
        cpu = "host" if accel == "kvm" else "max"
        args = [qemu, "-accel", accel, "-cpu", cpu, "-machine", "q35", "-nodefaults"]
        args += ["-display", "none"]
        args += ["-bios", f.name, "-m", "16", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x01"]
        try:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        except OSError:
            return False
        try:
            return _probe_outcome(proc, timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()


def _probe_outcome(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """read the probe's stderr until it exits (True when through the debug-exit port), prints
    a KVM internal error, or `timeout` passes (both False)."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    os.set_blocking(fd, False)
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(BlockingIOError):
            chunk = os.read(fd, 4096)
            if not chunk:  # stderr closed: QEMU is exiting
                try:
                    return proc.wait(timeout=max(0.1, deadline - time.monotonic())) == 3
                except subprocess.TimeoutExpired:
                    return False
            seen = (seen + chunk)[-8192:]
            if KVM_INTERNAL_ERROR in seen:
                return False
            continue
        if proc.poll() is not None:
            return proc.returncode == 3
        time.sleep(0.01)
    return False


def host_has_tdx() -> bool:
    try:
        return TDX_PARAM.read_text().strip() in ("Y", "1")
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mem_available_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return None


def is_qemu_of(pid: int, workdir: Path) -> bool:
    """whether `pid` is (still) the QEMU of the VM in `workdir` (pids get reused)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    qmp = f"unix:{workdir / 'qmp.sock'},server,wait=off".encode()
    return (
        bool(cmd)
        and b"qemu" in Path(cmd[0].decode(errors="replace")).name.encode()
        and (qmp in cmd)
    )


def log_tail(path: Path, size: int) -> list[str]:
    """the non-blank lines of the last `size` bytes of a log ([] when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - size))
            tail = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in tail.splitlines() if line.strip()]


def internal_error_line(stdout_log: Path) -> str:
    """QEMU's own line about a KVM internal error (with its suberror), from the end of its
    output, or "" (the register dump after it says nothing to a user)."""
    marker = KVM_INTERNAL_ERROR.decode()
    found = [ln.strip() for ln in log_tail(stdout_log, 16384) if marker in ln]
    return found[-1][:300] if found else ""


class AccelError(BackendError):
    """the accelerator stopped the guest (QMP status `internal-error`)."""


@dataclass
class _Cvm:
    proc: subprocess.Popen[bytes] | None = None
    pid: int = 0
    guest_api_port: int = 0
    command: list[str] = field(default_factory=list)


@dataclass
class _Verified:
    """an image file checked against sha256sum.txt, by its size and mtime."""

    size: int
    mtime: float


class QemuBackend:
    name = "qemu"

    def __init__(self, config: VmmConfig, settings: QemuConfig) -> None:
        self.config = config
        self.settings = settings
        self.tdx = settings.tdx == "auto" and host_has_tdx()
        self.accel = "tcg" if settings.accel == "tcg" else "kvm"
        others = [m for m in ("user", "bridge") if m != settings.networking_mode]
        modes = (settings.networking_mode, *(m for m in others if m == "user" or settings.bridge))
        self.capabilities = Capabilities(
            networking_modes=modes,
            default_bridge=settings.bridge,
            bridges=(settings.bridge,) if settings.bridge else (),
            max_networks=1,
            tee_kinds=("tdx", "simulated-tdx") if self.tdx else ("simulated-tdx",),
            no_tee=True,
            disk_resize=True,
            port_mapping=True,
            port_protocols=("tcp", "udp"),
            image_kinds=(IMAGE_KIND,),
            simulate_tee_requests=False,
            boot_timeout=settings.boot_timeout,
        )
        self._cvms: dict[str, _Cvm] = {}
        self._verified: dict[Path, _Verified] = {}

    # ------------------------------------------------------------------ host
    def host_problems(self) -> list[str]:
        problems = []
        try:
            self.settings.qemu()
        except ConfigError as e:
            problems.append(str(e))
        problems += [f"{t} is not installed" for t in REQUIRED_TOOLS if shutil.which(t) is None]
        return problems

    async def prepare(self) -> None:
        qemu = self.settings.qemu()
        if self.settings.accel == "auto":
            works = await asyncio.to_thread(kvm_works, qemu)
            self.accel = "kvm" if works else "tcg"
            if not works:
                log.warning(
                    "qemu backend: /dev/kvm does not run guests here; cvms run under tcg "
                    "(emulation: slow, and no hardware tee)"
                )
        log.info(
            "qemu backend: %s, accel %s, tdx %s", qemu, self.accel, "yes" if self.tdx else "no"
        )

    async def close(self) -> None:
        """nothing to release: QEMUs run in their own sessions and outlive the VMM."""

    # ------------------------------------------------------------------ per vm
    def attach(self, vm: Vm) -> None:
        cvm = _Cvm()
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            state = json.loads((vm.workdir.path / STATE_FILE).read_text())
            cvm.pid = int(state["pid"])
            cvm.guest_api_port = int(state.get("guest_api_port", 0))
            cvm.command = [str(a) for a in state.get("command", [])]
        self._cvms[vm.id] = cvm

    def detach(self, vm: Vm) -> None:
        self._cvms.pop(vm.id, None)

    def _cvm(self, vm: Vm) -> _Cvm:
        cvm = self._cvms.get(vm.id)
        if cvm is None:
            raise Refused(f"vm {vm.id} is not attached to the qemu backend")
        return cvm

    def host_api_channel(self, vm: Vm) -> HostApiChannel:
        url = f"http://{HOST_API_GUEST_ADDR}:{HOST_API_GUEST_PORT}/api"
        return HostApiChannel(vm.workdir.path / "host-api" / "api.sock", url)

    def check_start(self, vm: Vm) -> None:
        need = vm.manifest.memory + self.settings.min_free_memory_mb
        avail = mem_available_mb()
        if avail is not None and avail < need:
            raise Refused(
                f"not enough free host memory to start the vm: {avail} MiB available, {need} MiB "
                f"required (its {vm.manifest.memory} MiB and [cvm.qemu] min_free_memory_mb)"
            )

    # ------------------------------------------------------------------ launch
    def _image_file(self, image: Image, key: str, required: bool = True) -> Path | None:
        name = image.metadata.get(key)
        if name is None and not required:
            return None
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise BackendError(f"image {image.name}: metadata.json {key} must name a file in it")
        path = image.path / name
        if not path.is_file():
            raise BackendError(f"image {image.name} is missing its {key} ({name})")
        return path

    def verify_image(self, image: Image) -> None:
        """check every file sha256sum.txt lists (once per file version); BackendError for a
        file that is missing or does not match, so a corrupt image never boots."""
        listing = image.path / "sha256sum.txt"
        try:
            lines = listing.read_text().splitlines()
        except OSError as e:
            raise BackendError(f"image {image.name} has no sha256sum.txt: {e.strerror}") from e
        if hashlib.sha256(listing.read_bytes()).hexdigest() != image.digest:
            raise BackendError(f"image {image.name}: digest.txt is not sha256(sha256sum.txt)")
        for line in lines:
            want, _, name = line.partition("  ")
            path = image.path / name
            if not name or "/" in name:
                raise BackendError(f"image {image.name}: malformed sha256sum.txt line")
            try:
                st = path.stat()
            except OSError:
                raise BackendError(f"image {image.name} is missing {name}") from None
            seen = self._verified.get(path)
            if seen is not None and (seen.size, seen.mtime) == (st.st_size, st.st_mtime):
                continue
            with open(path, "rb") as f:
                got = hashlib.file_digest(f, "sha256").hexdigest()
            if got != want:
                raise BackendError(
                    f"image {image.name} is corrupt: {name} does not match its sha256sum.txt"
                )
            self._verified[path] = _Verified(st.st_size, st.st_mtime)

    def _data_disk(self, vm: Vm) -> None:
        """create the data disk on the first boot; grow it to the manifest's size (a resize of
        the stopped VM) on later ones."""
        hda = vm.workdir.path / "hda.img"
        if hda.exists():
            self._grow(hda, vm.manifest.disk_size)
            return
        tmp = hda.with_name(".hda.img.tmp")
        proc = subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(tmp), f"{vm.manifest.disk_size}G"],
            capture_output=True,
            check=False,
        )
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise BackendError(
                f"cannot create the data disk: {proc.stderr.decode(errors='replace').strip()}"
            )
        os.replace(tmp, hda)

    def _grow(self, hda: Path, size_gb: int) -> None:
        info = subprocess.run(
            ["qemu-img", "info", "--output", "json", "-U", str(hda)],
            capture_output=True,
            check=False,
        )
        try:
            current = int(json.loads(info.stdout)["virtual-size"])
        except (ValueError, KeyError, TypeError) as e:
            raise BackendError(f"cannot read the data disk: {e}") from e
        if current >= size_gb << 30:
            return
        proc = subprocess.run(
            ["qemu-img", "resize", "-q", str(hda), f"{size_gb}G"],
            capture_output=True,
            check=False,
        )
        if proc.returncode != 0:
            raise BackendError(
                f"cannot resize the data disk: {proc.stderr.decode(errors='replace').strip()}"
            )

    def launch_spec(self, vm: Vm, spec: BootSpec, guest_api_port: int) -> QemuLaunch:
        s = self.settings
        image = spec.image
        meta = image.metadata
        tdx = self.tdx and not spec.no_tee
        mrconfigid = None
        if tdx and s.use_mrconfigid:
            compose = vm.workdir.read_shared(hs.APP_COMPOSE) or b""
            mrconfigid = mr_config_id_b64(hashlib.sha256(compose).digest())
        nics = tuple(
            Nic(n.mode or s.networking_mode, n.bridge_name or s.bridge) for n in spec.networks
        ) or (Nic(s.networking_mode, s.bridge),)
        if not any(n.mode == "user" for n in nics):
            raise BackendError(
                "a vm on a bridge alone has no host-api channel on this host (no vsock): "
                'it needs a user-mode network ([cvm.qemu] networking_mode = "user")'
            )
        kernel = self._image_file(image, "kernel")
        initrd = self._image_file(image, "initrd")
        assert kernel is not None and initrd is not None
        return QemuLaunch(
            qemu=s.qemu(),
            workdir=vm.workdir.path,
            vm_id=vm.id,
            bios=self._image_file(image, "bios", required=False),
            kernel=kernel,
            initrd=initrd,
            rootfs=self._image_file(image, "rootfs", required=False),
            cmdline=str(meta.get("cmdline", "")),
            vcpu=spec.vcpu,
            memory_mb=spec.memory_mb,
            accel=self.accel,
            nics=nics,
            ports=spec.ports,
            net=s.net,
            dhcp_start=s.dhcp_start,
            restrict=s.restrict,
            host_api_socket=self.host_api_channel(vm).socket,
            guest_api_forward=(guest_api_port, GUEST_API_PORT),
            host_share_mode=s.host_share_mode,
            shared_ro=bool(meta.get("shared_ro", True)),
            smbios=((1, (("manufacturer", s.sys_vendor), ("product", s.product_name))),),
            tdx=tdx,
            mrconfigid=mrconfigid,
            qgs_port=s.qgs_port or None,
        )

    async def launch(self, vm: Vm, spec: BootSpec) -> None:
        cvm = self._cvm(vm)
        path = vm.workdir.path
        if spec.no_tee is False and not self.tdx:
            raise Refused("this host has no tdx: the vm cannot run under a hardware tee")
        await asyncio.to_thread(self.verify_image, spec.image)
        await asyncio.to_thread(self._data_disk, vm)
        for stale in ("qmp.sock", "serial.pty"):
            (path / stale).unlink(missing_ok=True)
        port = free_port()
        try:
            argv = qemu_command(self.launch_spec(vm, spec, port))
        except ValueError as e:
            raise BackendError(str(e)) from e
        if self.accel == "tcg":
            log.warning("vm %s runs under tcg (no usable kvm on this host)", vm.id)
        with open(spec.stdout_log, "ab") as out:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=path,
                )
            except OSError as e:
                raise BackendError(f"cannot start qemu: {e.strerror}") from e
        cvm.proc, cvm.pid, cvm.guest_api_port, cvm.command = proc, proc.pid, port, argv
        state = {"pid": proc.pid, "guest_api_port": port, "accel": self.accel, "command": argv}
        atomic_write(path / STATE_FILE, json.dumps(state, indent=2).encode())
        try:
            await self._wait_running(vm, spec.stdout_log)
        except AccelError as e:
            await self.stop(vm, 0)
            if self.settings.accel != "auto" or self.accel == "tcg":
                raise
            log.warning("vm %s: %s; this and later cvms run under tcg", vm.id, e)
            self.accel = "tcg"
            await self.launch(vm, spec)
            return
        except BaseException:
            await self.stop(vm, 0)
            raise
        log.info("started vm %s (qemu pid %d, %s)", vm.id, proc.pid, self.accel)

    async def _wait_running(self, vm: Vm, stdout_log: Path) -> None:
        """until QEMU's machine runs (QMP query-status); BackendError with QEMU's own words when
        it exits first or does not get there in START_TIMEOUT."""
        deadline = time.monotonic() + START_TIMEOUT
        sock = vm.workdir.path / "qmp.sock"
        while time.monotonic() < deadline:
            if not self.is_alive(vm):
                raise BackendError(f"qemu exited at start: {self.exit_detail(vm, stdout_log)}")
            if sock.exists():
                with contextlib.suppress(QmpError):
                    status = await qmp_command(sock, "query-status", timeout=2)
                    if isinstance(status, dict) and status.get("running"):
                        return
                    if isinstance(status, dict) and status.get("status") == "internal-error":
                        raise AccelError(
                            f"{self.accel} stopped the machine with an internal error (a nested "
                            "kvm that cannot run this guest?): "
                            f"{internal_error_line(stdout_log) or 'no detail from qemu'}"
                        )
            await asyncio.sleep(0.1)
        raise BackendError(f"qemu did not start its machine in {START_TIMEOUT:.0f} s")

    def exit_detail(self, vm: Vm, stdout_log: Path | None = None) -> str:
        """the last lines QEMU printed (why it exited), or ""."""
        lines = log_tail(stdout_log or vm.workdir.path / "stdout.log", 2000)
        return " / ".join(lines[-3:])[-600:]

    # ------------------------------------------------------------------ liveness and stop
    def is_alive(self, vm: Vm) -> bool:
        cvm = self._cvms.get(vm.id)
        if cvm is None:
            return False
        if cvm.proc is not None:
            if cvm.proc.poll() is None:
                return True
            cvm.proc, cvm.pid = None, 0
            return False
        if cvm.pid and is_qemu_of(cvm.pid, vm.workdir.path):
            return True
        cvm.pid = 0
        return False

    def process(self, vm: Vm) -> ProcessInfo | None:
        if not self.is_alive(vm):
            return None
        cvm = self._cvm(vm)
        started = vm.started_at
        if not started:
            with contextlib.suppress(OSError):
                started = (vm.workdir.path / STATE_FILE).stat().st_mtime
        return ProcessInfo(cvm.pid, " ".join(cvm.command), started)

    async def stop(self, vm: Vm, grace: float) -> None:
        """ACPI power-down through QMP for up to `grace` seconds, then SIGKILL."""
        cvm = self._cvms.get(vm.id)
        if cvm is None or not self.is_alive(vm):
            return
        pid = cvm.pid
        if grace:
            with contextlib.suppress(QmpError):
                await qmp_command(vm.workdir.path / "qmp.sock", "system_powerdown", timeout=2)
            deadline = time.monotonic() + grace
            while self.is_alive(vm) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        if self.is_alive(vm):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        for _ in range(200):
            if not self.is_alive(vm):
                break
            await asyncio.sleep(0.05)

    async def power_off(self, vm: Vm) -> None:
        if self.is_alive(vm):
            with contextlib.suppress(QmpError):
                await qmp_command(vm.workdir.path / "qmp.sock", "system_powerdown", timeout=2)

    async def cleanup(self, vm: Vm) -> None:
        for name in ("qmp.sock", "serial.pty"):
            (vm.workdir.path / name).unlink(missing_ok=True)

    # ------------------------------------------------------------------ views
    def interfaces(self, vm: Vm) -> list[InterfaceStatus]:
        specs = vm.manifest.networks or []
        mode = (specs[0].mode if specs else "") or self.settings.networking_mode
        if mode == "bridge":
            bridge = (specs[0].bridge_name if specs else "") or self.settings.bridge
            return [InterfaceStatus("bridge", "tap_bridge", mac_address(vm.id, 0), bridge, "net0")]
        return [InterfaceStatus("user", "slirp", mac_address(vm.id, 0), None, "net0")]

    def guest_api_address(self, vm: Vm) -> str | None:
        cvm = self._cvms.get(vm.id)
        if cvm is None or not cvm.guest_api_port or not self.is_alive(vm):
            return None
        return f"http://127.0.0.1:{cvm.guest_api_port}"

    def list_gpus(self) -> list[GpuDevice]:
        return []
