"""PID 1 of a QEMU guest (`/sbin/dstack-init` of the images :mod:`pydstack.vmm.backends.qemu`
builds): the system mounts, the network of QEMU's user-mode NIC, the host share, then the guest
(:mod:`pydstack.guest.qemu`) as its child; it reaps orphans, passes SIGTERM on, and powers the
VM off when the guest ends (a failed boot included: the VMM then shows the VM exited, with the
guest's boot error).

Kept to the standard library so the process that lives as long as the VM stays small.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

#: QEMU's user-mode network as upstream configures it: the address its DHCP gives first (where
#: `hostfwd` forwards to) and the host; used when DHCP does not answer
GUEST_IP = "10.0.2.10/24"
GATEWAY = "10.0.2.2"
#: applies a DHCP lease (written into the image by its build)
UDHCPC_SCRIPT = "/usr/lib/dstack/udhcpc.sh"
HOST_SHARED = Path("/run/dstack/host-shared")
HOST_SHARE_TAG = "host-shared"
#: the FAT label of a vvfat host share (upstream's)
HOST_SHARE_LABEL = "DSTACKSHR"
MODULES = ("9p", "9pnet_virtio", "virtio_net", "dm_crypt", "evdev", "button", "vfat")
RB_POWER_OFF = 0x4321FEDC


def _run(*args: str) -> int:
    return subprocess.run(args, check=False).returncode


def _mount(fstype: str, source: str, target: str, options: str = "") -> None:
    Path(target).mkdir(parents=True, exist_ok=True)
    args = ["mount", "-t", fstype]
    if options:
        args += ["-o", options]
    if _run(*args, source, target) != 0:
        print(f"dstack-init: cannot mount {fstype} on {target}", flush=True)


def system_mounts() -> None:
    _mount("proc", "proc", "/proc")
    _mount("sysfs", "sysfs", "/sys")
    if not Path("/dev/null").exists():
        _mount("devtmpfs", "devtmpfs", "/dev")
    _mount("devpts", "devpts", "/dev/pts", "gid=5,mode=620,ptmxmode=666")
    _mount("tmpfs", "tmpfs", "/dev/shm", "mode=1777,nosuid,nodev")
    _mount("tmpfs", "tmpfs", "/run", "mode=755,nosuid,nodev")
    _mount("tmpfs", "tmpfs", "/tmp", "mode=1777,nosuid,nodev")
    _mount("cgroup2", "cgroup2", "/sys/fs/cgroup")
    with contextlib.suppress(OSError):
        os.symlink("/run", "/var/run") if not Path("/var/run").exists() else None
    # one modprobe for all: under TCG each process start is a fraction of a second
    subprocess.run(["modprobe", "-a", "-q", *MODULES], check=False)


def network() -> None:
    with contextlib.suppress(OSError):
        socket.sethostname(Path("/etc/hostname").read_text().strip() or "dstack-cvm")
    _run("ip", "link", "set", "lo", "up")
    _run("ip", "link", "set", "eth0", "up")
    dhcp = [
        "busybox",
        "udhcpc",
        "-i",
        "eth0",
        "-n",
        "-q",
        "-t",
        "5",
        "-T",
        "1",
        "-s",
        UDHCPC_SCRIPT,
    ]
    if _run(*dhcp) != 0:
        print("dstack-init: no dhcp answer; using upstream's user-mode address", flush=True)
        _run("ip", "addr", "add", GUEST_IP, "dev", "eth0")
        _run("ip", "route", "add", "default", "via", GATEWAY)


def host_share() -> None:
    """the host share, read-only: 9p (tag host-shared) or a vvfat disk labelled DSTACKSHR."""
    HOST_SHARED.mkdir(parents=True, exist_ok=True)
    opts = "trans=virtio,version=9p2000.L,ro"
    if _run("mount", "-t", "9p", "-o", opts, HOST_SHARE_TAG, str(HOST_SHARED)) == 0:
        return
    label = Path("/dev/disk/by-label", HOST_SHARE_LABEL)
    for dev in [label, *sorted(Path("/dev").glob("vd[c-z]"))]:
        if (
            dev.exists()
            and _run("mount", "-t", "vfat", "-o", "ro", str(dev), str(HOST_SHARED)) == 0
        ):
            return
    print("dstack-init: no host share found (9p or vvfat)", flush=True)


def power_off() -> None:
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(RB_POWER_OFF)
    time.sleep(5)


def uptime() -> float:
    """seconds since the kernel started (0 when /proc is not there)."""
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def main() -> int:
    if os.getpid() != 1:
        print("dstack-init must run as pid 1", file=sys.stderr)
        return 2
    os.environ.update({"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"})
    try:
        system_mounts()
        print(f"dstack-init: started {uptime():.1f} s after the kernel", flush=True)
        network()
        net_at = uptime()
        host_share()
        print(
            f"dstack-init: network up at {net_at:.1f} s, host share at {uptime():.1f} s; "
            "starting the guest",
            flush=True,
        )
        child = subprocess.Popen([sys.executable, "-m", "pydstack.guest.qemu"])
    except Exception as e:  # the vm cannot come up: say why on the console, then power off
        print(f"dstack-init: {type(e).__name__}: {e}; powering off", flush=True)
        power_off()
        return 1

    def forward(sig: int, _: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 1
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == child.pid:
            code = os.waitstatus_to_exitcode(status)
            break
    print(f"dstack-init: the guest exited with status {code}; powering off", flush=True)
    with contextlib.suppress(OSError):
        os.kill(-1, signal.SIGTERM)
    time.sleep(1)
    with contextlib.suppress(OSError):
        os.kill(-1, signal.SIGKILL)
    subprocess.run(["umount", "-a", "-r"], check=False, capture_output=True)
    power_off()
    return code


if __name__ == "__main__":
    sys.exit(main())
