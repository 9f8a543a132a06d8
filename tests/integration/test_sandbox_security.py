"""an app is hostile to its CVM, and a CVM to its host and its neighbours (sandbox backend).

Each test is an attack that once worked against the local stack: it must now end in a refusal,
with nothing changed. Real processes throughout (dev stack, sandbox CVMs, podman).
"""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pydstack.apps.image import hello_image
from pydstack.devstack import DevStack, free_port
from pydstack.vmm.backends.sandbox.network import names_for

from .test_vmm_sandbox import compose, deploy, get, vm_id_of, wait_for

pytestmark = pytest.mark.integration

BRIDGE, SUBNET = "dstacktest5", "10.211.0.0/16"
#: what the probe service prints about its own view of the world
PROBE = (
    "cat /proc/self/uid_map; "
    "[ -e /run/dstack ] && echo SEES-CVM-RUNTIME || echo no-cvm-runtime; "
    "[ -e /run/dstack/host-shared ] && echo SEES-HOST-SHARE || echo no-host-share; "
    "exec sleep 100000"
)


@pytest.fixture(scope="module")
def image(stack: DevStack) -> str:
    return stack.push_image(hello_image())


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = DevStack(tmp_path_factory.mktemp("sec"), bridge=BRIDGE, subnet=SUBNET)
    try:
        s.start()
        yield s
    finally:
        s.stop(remove_bridge=True)


def write_app(d: Path, image: str, *, probe: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    extra = ""
    if probe:
        extra = f"""
  probe:
    image: {image}
    entrypoint: ["sh", "-c", {json.dumps(PROBE)}]
"""
    (d / "docker-compose.yml").write_text(f"""
services:
  hello:
    image: {image}
    environment:
      PORT: "8080"
    volumes:
      - /var/run/dstack.sock:/var/run/dstack.sock
      - data:/data
{extra}
volumes:
  data:
""")
    (d / "env").write_text("")
    return d


def boot(stack: DevStack, d: Path, name: str, *, kms: bool) -> tuple[str, int]:
    app_id, chash = compose(stack, d, name, kms=kms)
    if kms:
        stack.allow({app_id: [chash]})
    port = free_port()
    vm = vm_id_of(deploy(stack, d, name, "--port", f"tcp:127.0.0.1:{port}:8080").stdout)
    stack.wait_vm(vm)
    get(port, "/health")
    return vm, port


FAILED_PROBES: list[str] = []


def connects_from(vm: str, host: str, port: int) -> bool:
    """whether a tcp connection from inside `vm`'s network (what its app shares) succeeds
    (why one failed is kept in FAILED_PROBES for the assertion messages)."""
    probe = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 3)"
    out = subprocess.run(
        ["nsenter", f"--net=/run/netns/{names_for(vm)[0]}", sys.executable, "-c", probe, host,
         str(port)],
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    if out.returncode != 0:
        last = out.stderr.decode(errors="replace").strip().splitlines()[-1:]
        FAILED_PROBES.append(f"{host}:{port}: {' '.join(last)}")
    return out.returncode == 0


def guest_ip(stack: DevStack, vm: str) -> str:
    net = httpx.post(f"{stack.vmm_url}/guest/NetworkInfo?json", json={"id": vm}).json()
    eth0 = next(i for i in net["interfaces"] if i["name"] == "eth0")
    return str(eth0["addresses"][0]["address"])


def test_app_containers_are_unprivileged_and_blind_to_the_cvm(stack, image, tmp_path):
    d = write_app(tmp_path / "probe", image, probe=True)
    vm, port = boot(stack, d, "probe", kms=True)
    wd = stack.dir / "run" / "vm" / vm
    base = json.loads((wd / "launch.json").read_text())["uid_base"]
    assert base >= 65536
    wait_for(lambda: "probe | no-host-share" in stack.logs(vm, 300), "the probe's report")
    logs = stack.logs(vm, 300)
    # container root is an unprivileged host uid of this cvm's own range, not host root
    maps = [line.split("|", 1)[1].split() for line in logs.splitlines() if "probe | " in line]
    assert ["0", str(base), "65536"] in maps, logs
    assert "probe | no-cvm-runtime" in logs and "SEES-" not in logs
    # and yet the app gets its keys through the agent socket and writes its volume
    assert len(get(port, "/key", path="a", purpose="b")["key"]) == 64
    r = httpx.post(f"http://127.0.0.1:{port}/data", params={"name": "n"}, content=b"v")
    assert r.status_code == 200, r.text

    # the td is the vmm's: no file a cvm can see holds the quote-signing seed
    seed = stack.seed_file.read_text().strip()
    assert not (wd / "shared" / ".tee-simulator.json").exists()
    for f in wd.rglob("*"):
        if f.is_file() and not f.is_socket() and "data" not in f.relative_to(wd).parts:
            assert seed.encode() not in f.read_bytes(), f
    # quotes still verify and replay (the td answered over the host api)
    q = get(port, "/quote", report_data="ab" * 32)
    assert q["quote"] and "compose-hash" in q["event_log"]


def test_cvms_reach_neither_each_other_nor_other_host_services(stack, image, tmp_path):
    a, _ = boot(stack, write_app(tmp_path / "a", image), "net-a", kms=False)
    b, b_port = boot(stack, write_app(tmp_path / "b", image), "net-b", kms=False)
    a_ip, b_ip = guest_ip(stack, a), guest_ip(stack, b)
    kms_port = int(stack.kms_url.rsplit(":", 1)[1])
    # the probe works where traffic is allowed: a cvm's own app, its kms on the host (a few
    # tries: on a loaded machine one 3 s connect may time out where nothing refuses it)
    assert any(connects_from(a, a_ip, 8080) for _ in range(3)), FAILED_PROBES[-3:]
    assert any(connects_from(a, stack.host_ip, kms_port) for _ in range(3)), FAILED_PROBES[-3:]
    # never a neighbour, in either direction
    assert not connects_from(a, b_ip, 8080)
    assert not connects_from(b, a_ip, 8080)
    # nor a host service it was not given (a listener on all addresses)
    with socket.socket() as other:
        other.bind(("0.0.0.0", 0))
        other.listen()
        assert not connects_from(a, stack.host_ip, other.getsockname()[1])
    # the vmm's own api is not reachable from a cvm either
    vmm_port = int(stack.vmm_url.rsplit(":", 1)[1])
    assert not connects_from(a, stack.host_ip, vmm_port)
    # while the host reaches b's mapped port as before
    assert get(b_port, "/health") == {"ok": True}


def test_dev_stack_keeps_its_seed_and_kms_to_itself(stack):
    for f in (stack.seed_file, stack.vmm_config, stack.dir / "kms.toml"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    seed = bytes.fromhex(stack.seed_file.read_text().strip())
    assert len(seed) == 32 and seed != bytes.fromhex("a1" * 32)  # the old public seed
    assert seed.hex() not in stack.vmm_config.read_text()
    # the kms listens on the cvm bridge's host address only, not on all addresses
    host, port = stack.kms_url.removeprefix("https://").rsplit(":", 1)
    assert host == stack.host_ip
    with socket.socket() as s:
        s.settimeout(3)
        assert s.connect_ex(("127.0.0.1", int(port))) != 0
    assert stack.pccs_url.startswith("http://127.0.0.1:")


def test_update_ports_gets_the_checks_create_makes(stack, image, tmp_path):
    d = write_app(tmp_path / "ports", image)
    compose(stack, d, "ports", kms=False)
    vm = vm_id_of(deploy(stack, d, "ports", "--stopped").stdout)
    manifest = (stack.dir / "run" / "vm" / vm / "vm-manifest.json").read_text()

    def update(ports: list[dict[str, object]]) -> httpx.Response:
        body = {"id": vm, "update_ports": True, "ports": ports}
        return httpx.post(f"{stack.vmm_url}/prpc/UpdateVm?json", json=body)

    r = update([{"protocol": "tcp", "host_address": "0.0.0.0", "host_port": 81, "vm_port": 80}])
    assert r.status_code == 400 and "outside the allowed ranges" in r.json()["error"]
    r = update([{"protocol": "sctp", "host_port": 20000, "vm_port": 80}])
    assert r.status_code == 400 and "protocol" in r.json()["error"]
    r = update([{"protocol": "tcp", "host_address": "nope", "host_port": 20000, "vm_port": 80}])
    assert r.status_code == 400 and "host address" in r.json()["error"]
    assert (stack.dir / "run" / "vm" / vm / "vm-manifest.json").read_text() == manifest
    # an allowed change goes through, with the configured default address
    port = free_port()
    assert update([{"protocol": "tcp", "host_port": port, "vm_port": 80}]).status_code == 200
    m = json.loads((stack.dir / "run" / "vm" / vm / "vm-manifest.json").read_text())
    assert [(p["address"], p["from"]) for p in m["port_map"]] == [("127.0.0.1", port)]
    httpx.post(f"{stack.vmm_url}/prpc/RemoveVm?json", json={"id": vm})


def test_no_stack_secret_on_a_command_line(stack):
    """the seed reaches the pccs as a file, never on a command line others can read."""
    seed = stack.seed_file.read_text().strip()
    for proc in stack.procs.values():
        if proc.proc is not None:
            cmdline = Path(f"/proc/{proc.proc.pid}/cmdline").read_bytes()
            assert seed.encode() not in cmdline


ESCAPES = {
    "host root mount": ("volumes: ['/:/host']", "volumes"),
    "privileged": ("privileged: true", "privileged"),
    "extra capability": ("cap_add: [SYS_ADMIN]", "cap_add"),
    "host pid namespace": ("pid: host", "pid"),
    "host network": ("network_mode: host", "network_mode"),
    "a device": ("devices: ['/dev/kmsg:/dev/kmsg']", "devices"),
}


def _escape_compose(image: str, line: str) -> str:
    return f"services:\n  evil:\n    image: {image}\n    {line}\n"


@pytest.mark.parametrize("what", sorted(ESCAPES))
def test_vmm_refuses_a_compose_that_would_escape(stack, image, tmp_path, what):
    line, key = ESCAPES[what]
    app = {"manifest_version": 2, "name": "evil", "runner": "docker-compose",
           "docker_compose_file": _escape_compose(image, line), "key_provider": "none"}  # fmt: skip
    before = {p.name for p in (stack.dir / "run" / "vm").iterdir()}
    r = httpx.post(
        f"{stack.vmm_url}/prpc/CreateVm?json",
        json={"name": "evil", "image": "pydstack-sandbox", "compose_file": json.dumps(app)},
    )
    assert r.status_code == 400 and key in r.json()["error"], r.text
    # nothing was created (earlier tests' vms may still be on their way out)
    assert not {p.name for p in (stack.dir / "run" / "vm").iterdir()} - before


def test_guest_refuses_at_boot_what_the_host_slipped_past_the_vmm(stack, image, tmp_path):
    """the vmm's check is a courtesy; the guest's is the one that holds: a host that rewrites
    the app-compose in the share gets a boot error naming the key, and no container runs."""
    d = write_app(tmp_path / "tamper", image)
    compose(stack, d, "tamper", kms=False)
    vm = vm_id_of(deploy(stack, d, "tamper", "--stopped").stdout)
    shared = stack.dir / "run" / "vm" / vm / "shared" / "app-compose.json"
    app = json.loads(shared.read_text())
    app["docker_compose_file"] = _escape_compose(image, "volumes: ['/etc:/hostetc']")
    shared.write_text(json.dumps(app))
    httpx.post(f"{stack.vmm_url}/prpc/StartVm?json", json={"id": vm})
    wait_for(lambda: stack.info(vm).get("status") == "exited", "the refused cvm to halt", 90)
    error = stack.info(vm)["boot_error"]
    assert "volumes" in error and "/etc" in error, error
    assert "starting containers" not in stack.logs(vm, 200)
    httpx.post(f"{stack.vmm_url}/prpc/RemoveVm?json", json={"id": vm})
