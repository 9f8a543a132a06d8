"""the in-CVM docker-compose runner: the podman arguments, mounts, and following output."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from pydstack.guest.compose_runner import MAX_PREFETCH, ImagePrefetch, PodmanCompose, named_images
from pydstack.types.docker_compose import PERMISSIVE, STRICT, ComposeError, ComposeProject, Mount

COMPOSE = """
services:
  web:
    image: localhost/web:1
    command: ["serve", "--port", "${PORT:-8080}"]
    environment:
      TOKEN: ${TOKEN}
      LITERAL: "$$HOME"
      FLAG: true
    volumes:
      - /var/run/dstack.sock:/var/run/dstack.sock
      - data:/data:ro
    depends_on: [db]
    restart: unless-stopped
    user: "1000:1000"
    working_dir: /srv
    entrypoint: [/bin/sh, -c]
  db:
    image: localhost/db:1
    environment: ["A=1", "B"]
volumes:
  data:
"""


def test_parse_orders_dependencies_and_maps_fields():
    p = ComposeProject.parse(COMPOSE, "app", {"TOKEN": "t"})
    assert [s.name for s in p.services] == ["db", "web"]
    web = p.services[1]
    assert web.command == ["serve", "--port", "8080"]
    assert web.environment == {"TOKEN": "t", "LITERAL": "$HOME", "FLAG": "true"}
    assert Mount("socket", "/var/run/dstack.sock", "/var/run/dstack.sock") in web.volumes
    assert Mount("volume", "data", "/data", True) in web.volumes
    assert p.services[0].environment == {"A": "1", "B": ""}


def test_env_values_come_only_from_the_given_env(monkeypatch):
    monkeypatch.setenv("TOKEN", "from-the-host")
    p = ComposeProject.parse(COMPOSE, "app", {})
    assert p.services[1].environment["TOKEN"] == ""


def runner(tmp_path: Path, text: str = COMPOSE, **kw) -> tuple[ComposeProject, PodmanCompose]:
    p = ComposeProject.parse(text, "app", {"TOKEN": "t"}, policy=kw.pop("policy", STRICT))
    pc = PodmanCompose(
        p,
        storage_conf=tmp_path / "storage.conf",
        volumes_dir=tmp_path / "vols",
        binds_dir=tmp_path / "binds",
        **kw,
    )
    return p, pc


def test_podman_run_arguments(tmp_path: Path):
    p, pc = runner(tmp_path)
    args = pc.run_args(p.services[1])
    assert args[:5] == ["run", "-d", "--pull=missing", "--name=app-web-1", "--network=host"]
    assert "--add-host=db:127.0.0.1" in args
    assert f"--volume={tmp_path / 'vols' / 'app_data'}:/data:ro" in args
    assert "--volume=/var/run/dstack.sock:/var/run/dstack.sock" in args
    assert (tmp_path / "vols" / "app_data").is_dir()
    assert "--restart=unless-stopped" in args and "--env=TOKEN=t" in args
    assert args[-4:] == ["localhost/web:1", "serve", "--port", "8080"]
    assert "--user=1000:1000" in args and "--workdir=/srv" in args
    assert '--entrypoint=["/bin/sh", "-c"]' in args
    # every option carries its value, so the image is the first argument without a dash
    assert next(a for a in args[1:] if not a.startswith("-")) == "localhost/web:1"
    assert "--privileged" not in args
    assert pc.env["CONTAINERS_STORAGE_CONF"] == str(tmp_path / "storage.conf")


def test_agent_sockets_map_to_the_real_sockets(tmp_path: Path):
    text = (
        "services:\n  web:\n    image: i\n    volumes:\n"
        "      - /var/run/dstack.sock:/var/run/dstack.sock\n"
        "      - /run/tappd.sock:/tappd.sock:ro\n"
    )
    real = {"/var/run/dstack.sock": tmp_path / "agent" / "dstack.sock"}
    p, pc = runner(tmp_path, text, agent_sockets=real)
    args = pc.run_args(p.services[0])
    assert f"--volume={tmp_path / 'agent' / 'dstack.sock'}:/var/run/dstack.sock" in args
    assert "--volume=/run/tappd.sock:/tappd.sock:ro" in args  # unmapped: the same path


def test_relative_binds_land_in_the_bind_directory(tmp_path: Path):
    text = (
        "services:\n  web:\n    image: i\n    volumes:\n"
        "      - ./data:/data\n      - ./conf/app/../x:/x:ro\n      - .:/all\n"
        "      - {type: tmpfs, target: /cache, tmpfs: {size: 1m}}\n"
    )
    p, pc = runner(tmp_path, text)
    args = pc.run_args(p.services[0])
    binds = tmp_path / "binds"
    assert f"--volume={binds / 'data'}:/data" in args
    assert f"--volume={binds / 'conf' / 'x'}:/x:ro" in args
    assert f"--volume={binds}:/all" in args
    assert "--tmpfs=/cache:size=1m" in args
    for d in (binds, binds / "data", binds / "conf", binds / "conf" / "x"):
        assert d.is_dir() and d.stat().st_mode & 0o777 == 0o700, d


def test_a_symlink_in_a_bind_path_is_refused(tmp_path: Path):
    text = "services:\n  web:\n    image: i\n    volumes: [./shared/escape:/x]\n"
    p, pc = runner(tmp_path, text)
    (tmp_path / "binds" / "shared").mkdir(parents=True)
    (tmp_path / "binds" / "shared" / "escape").symlink_to("/")
    with pytest.raises(ComposeError, match="symlink"):
        pc.run_args(p.services[0])
    (tmp_path / "binds" / "shared" / "escape").unlink()
    (tmp_path / "binds" / "shared").rmdir()
    (tmp_path / "binds" / "shared").symlink_to(tmp_path)
    with pytest.raises(ComposeError, match="symlink"):
        pc.run_args(p.services[0])
    with pytest.raises(ComposeError, match="leaves the app's bind directory"):
        pc.bind_source("../outside")
    assert not (tmp_path / "outside").exists()


def test_permissive_policy_reaches_podman(tmp_path: Path):
    text = (
        "services:\n  web:\n    image: i\n    privileged: true\n    cap_add: [SYS_ADMIN]\n"
        "    cap_drop: [NET_RAW]\n    devices: [/dev/fuse]\n    pid: host\n"
        "    security_opt: [seccomp=unconfined]\n    sysctls: {net.core.somaxconn: 1024}\n"
        "    volumes: [/srv:/srv]\n"
    )
    p, pc = runner(tmp_path, text, policy=PERMISSIVE)
    args = pc.run_args(p.services[0])
    for a in (
        "--privileged", "--cap-add=SYS_ADMIN", "--cap-drop=NET_RAW", "--device=/dev/fuse",
        "--pid=host", "--security-opt=seccomp=unconfined", "--sysctl=net.core.somaxconn=1024",
        "--volume=/srv:/srv",
    ):  # fmt: skip
        assert a in args, a


async def test_service_output_is_followed_from_the_k8s_file_log(tmp_path: Path, capsys):
    import asyncio

    p, pc = runner(tmp_path)
    web = p.services[1]
    assert pc.log_path(web).parent == tmp_path / "container-logs"
    pc.log_path(web).parent.mkdir(parents=True)
    ts = "2026-12-02T17:00:00.000000000+00:00"
    pc.log_path(web).write_text(f"{ts} stdout P hel\n{ts} stdout F lo\n{ts} stderr F oops\n")
    task = asyncio.create_task(pc._follow(web))
    await asyncio.sleep(0.5)
    with pc.log_path(web).open("a") as f:  # appended later, and a half-written last line
        f.write(f"{ts} stdout F more\n{ts} stdout F unfinis")
    await asyncio.sleep(0.5)
    pc.log_path(web).write_text(f"{ts} stdout F after rotation\n")  # shorter: rotated
    await asyncio.sleep(0.5)
    task.cancel()
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["web | hello", "web | oops", "web | more", "web | after rotation"]


def test_user_namespace_maps_container_root_and_owns_what_it_creates(tmp_path: Path):
    text = "services:\n  web:\n    image: i\n    volumes: [data:/data, ./b:/b]\nvolumes:\n  data:\n"
    base = 65536 * 7
    p, pc = runner(tmp_path, text, userns=(base, 65536))
    args = pc.run_args(p.services[0])
    assert f"--uidmap=0:{base}:65536" in args and f"--gidmap=0:{base}:65536" in args
    for made in (tmp_path / "vols" / "app_data", tmp_path / "binds" / "b"):
        st = made.stat()
        assert (st.st_uid, st.st_gid) == (base, base), made
    # without a user namespace nothing is mapped or handed over
    p, pc = runner(tmp_path / "plain", text)
    args = pc.run_args(p.services[0])
    assert not any(a.startswith(("--uidmap", "--gidmap")) for a in args)
    assert (tmp_path / "plain" / "vols" / "app_data").stat().st_uid == 0


def test_the_cvm_registries_conf_mirrors_docker_io_to_the_vmm_registry(tmp_path, monkeypatch):
    import tomllib

    from pydstack.guest import sandbox
    from pydstack.guest.boot import BootError

    monkeypatch.setattr(sandbox, "DSTACK", tmp_path)
    conf = tomllib.loads(sandbox.registries_conf("http://10.213.0.1:5000").read_text())
    assert conf["unqualified-search-registries"] == ["docker.io"]
    hub, direct = conf["registry"]
    assert hub["prefix"] == "docker.io"
    assert hub["mirror"] == [{"location": "10.213.0.1:5000", "insecure": True}]
    assert direct == {"location": "10.213.0.1:5000", "insecure": True}
    assert "registry" not in tomllib.loads(sandbox.registries_conf("").read_text())
    # written again while a pull started ahead reads it: replaced whole, never truncated in place
    with open(sandbox.registries_conf("http://10.213.0.1:5000"), "rb") as reader:
        before = os.fstat(reader.fileno()).st_ino
        again = sandbox.registries_conf("http://10.213.0.1:5000")
        assert os.stat(again).st_ino != before and b"10.213.0.1:5000" in reader.read()
    for bad in ('http://h:1"\n[[registry]]', "http://h:1/path", "http://user@h:1", "h h"):
        with pytest.raises(BootError, match="invalid docker_registry"):
            sandbox.registries_conf(bad)


def test_storage_conf_keeps_pulled_images_and_mounts_no_host_store(tmp_path, monkeypatch):
    from pydstack.guest import sandbox

    monkeypatch.setattr(sandbox, "DSTACK", tmp_path)
    wd = tmp_path / "vm"
    (wd / "containers" / "overlay-images").mkdir(parents=True)
    text = sandbox.storage_conf(wd).read_text()
    assert "additionalimagestores" not in text and f'graphroot = "{wd / "containers"}"' in text
    assert (wd / "containers" / "overlay-images").is_dir()


def _podman_script(tmp_path: Path, body: str) -> Path:
    """a podman that is the shell script `body`."""
    script = tmp_path / "podman"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def _recording_podman(tmp_path: Path) -> tuple[Path, Path]:
    """a podman that logs its arguments; `image exists` answers "no" (status 1)."""
    log = tmp_path / "calls.log"
    body = f'echo "$*" >> {log}\nif [ "$1 $2" = "image exists" ]; then exit 1; fi'
    return _podman_script(tmp_path, body), log


@pytest.mark.parametrize("new_storage", [True, False])
async def test_up_on_new_storage_skips_the_image_check_and_the_cleanup(tmp_path, new_storage):
    podman, log = _recording_podman(tmp_path)
    _, pc = runner(tmp_path, podman=str(podman), new_storage=new_storage)
    await pc.up()
    for t in pc._log_tasks:
        t.cancel()
    verbs = [" ".join(line.split()[:2]) for line in log.read_text().splitlines()]
    pulls = ["pull --quiet"] * 2  # both images, each once
    runs = ["run -d"] * 2
    if new_storage:
        assert verbs == [*pulls, *runs]
    else:
        checks = ["image exists", "pull --quiet"]
        assert verbs == [*checks, *checks, "rm --ignore", *runs]
    # a second up in the same boot must clear what the first one started
    log.write_text("")
    await pc.up()
    for t in pc._log_tasks:
        t.cancel()
    assert "rm --ignore" in [" ".join(line.split()[:2]) for line in log.read_text().splitlines()]


# ------------------------------------------------------------------ images pulled ahead
def test_only_images_named_outright_are_pulled_ahead():
    text = """
services:
  a: {image: localhost/web:1}
  b: {image: "${IMAGE}"}
  c: {image: "localhost/db:$TAG"}
  d: {image: localhost/web:1}
  e: {image: "--privileged"}
  f: {build: .}
  g: {image: localhost/db:1}
"""
    assert named_images(text) == ["localhost/web:1", "localhost/db:1"]
    for bad in ("services: [", "- a", "services: 5", "a: &x [*x]", ""):
        assert named_images(bad) == [], bad
    many = "services:\n" + "".join(f"  s{i}: {{image: img{i}}}\n" for i in range(40))
    assert named_images(many) == [f"img{i}" for i in range(MAX_PREFETCH)]


async def test_images_pulled_ahead_are_not_pulled_again(tmp_path):
    podman, log = _recording_podman(tmp_path)
    ahead = ImagePrefetch(["localhost/db:1", "localhost/other:1"], {}, podman=str(podman))
    _, pc = runner(tmp_path, podman=str(podman), new_storage=True, prefetch=ahead)
    await pc.up()
    for t in pc._log_tasks:
        t.cancel()
    calls = log.read_text().splitlines()
    assert [c for c in calls if c.startswith("pull")] == [
        "pull --quiet -- localhost/db:1",
        "pull --quiet -- localhost/other:1",
        "pull --quiet -- localhost/web:1",  # not pulled ahead: pulled at up
    ]
    assert [" ".join(c.split()[:2]) for c in calls[3:]] == ["run -d"] * 2


async def test_a_failed_pull_ahead_is_pulled_again_and_its_error_reported_there(tmp_path):
    log = tmp_path / "calls.log"
    # every pull fails: the one ahead quietly, the one at up with the boot's error
    podman = _podman_script(tmp_path, f'echo "$*" >> {log}\necho "manifest unknown"; exit 125')
    ahead = ImagePrefetch(["localhost/db:1"], {}, podman=str(podman))
    _, pc = runner(tmp_path, podman=str(podman), new_storage=True, prefetch=ahead)
    with pytest.raises(ComposeError, match=r"image localhost/db:1 of service db cannot be pulled"):
        await pc.up()
    assert log.read_text().splitlines() == ["pull --quiet -- localhost/db:1"] * 2


async def test_cancelling_the_pulls_ahead_stops_podman(tmp_path):
    pidfile = tmp_path / "pid"
    podman = _podman_script(tmp_path, f"echo $$ > {pidfile}\nexec sleep 60")
    ahead = ImagePrefetch(["localhost/db:1"], {}, podman=str(podman))
    for _ in range(500):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.01)
    pid = int(pidfile.read_text())
    await ahead.cancel()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert await ahead.pulled() == set()
