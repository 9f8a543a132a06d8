"""the in-CVM docker-compose runner: parsing, interpolation and the podman arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from pydstack.guest.compose_runner import ComposeError, ComposeProject, PodmanCompose, interpolate

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
  db:
    image: localhost/db:1
    environment: ["A=1", "B"]
volumes:
  data:
"""


def test_interpolation_rules():
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("${SET} $SET ${MISSING} $$", env) == "v v  $"
    assert interpolate("${EMPTY:-d} ${EMPTY-d} ${MISSING-d}", env) == "d  d"
    with pytest.raises(ComposeError, match="required variable MISSING"):
        interpolate("${MISSING:?set it}", env)


def test_parse_orders_dependencies_and_maps_fields():
    p = ComposeProject.parse(COMPOSE, "app", {"TOKEN": "t"})
    assert [s.name for s in p.services] == ["db", "web"]
    web = p.services[1]
    assert web.command == ["serve", "--port", "8080"]
    assert web.environment == {"TOKEN": "t", "LITERAL": "$HOME", "FLAG": "true"}
    assert ("bind", "/var/run/dstack.sock", "/var/run/dstack.sock", False) in web.volumes
    assert ("volume", "data", "/data", True) in web.volumes
    assert p.services[0].environment == {"A": "1", "B": ""}


def test_env_values_come_only_from_the_given_env(monkeypatch):
    monkeypatch.setenv("TOKEN", "from-the-host")
    p = ComposeProject.parse(COMPOSE, "app", {})
    assert p.services[1].environment["TOKEN"] == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("services: [", "not valid yaml"),
        ("- a\n- b\n", "must be a mapping"),
        ("services: {}\n", "no services"),
        ("services:\n  a:\n    build: .\n", "build"),
        ("services:\n  a:\n    command: x\n", "no image"),
        ("services:\n  'bad name!':\n    image: x\n", "invalid service name"),
        ("services:\n  a:\n    image: x\n    volumes: [nope:/d]\n", "not declared"),
        ("services:\n  a:\n    image: x\n    volumes: [/h:rel]\n", "must be absolute"),
        ("services:\n  a:\n    image: x\n    depends_on: [b]\n", "unknown service b"),
        ("services:\n  a:\n    image: x\n    network_mode: 'container:y'\n", "network_mode"),
        (
            "services:\n  a:\n    image: x\n    depends_on: [b]\n"
            "  b:\n    image: x\n    depends_on: [a]\n",
            "cycle",
        ),
    ],
)
def test_malformed_compose_is_a_clear_error(text, message):
    with pytest.raises(ComposeError, match=message):
        ComposeProject.parse(text, "app", {})


def test_oversized_compose_is_refused_before_parsing():
    with pytest.raises(ComposeError, match="exceeds"):
        ComposeProject.parse("#" * (4 * 1024 * 1024 + 1), "app", {})


def test_podman_run_arguments(tmp_path: Path):
    p = ComposeProject.parse(COMPOSE, "app", {"TOKEN": "t"})
    pc = PodmanCompose(p, storage_conf=tmp_path / "storage.conf", volumes_dir=tmp_path / "vols")
    args = pc.run_args(p.services[1])
    assert args[:6] == ["run", "-d", "--pull=never", "--name", "app-web-1", "--network"]
    assert "--add-host" in args and "db:127.0.0.1" in args
    assert f"{tmp_path / 'vols' / 'app_data'}:/data:ro" in args
    assert (tmp_path / "vols" / "app_data").is_dir()
    assert args[args.index("--restart") + 1] == "unless-stopped"
    assert args[-4:] == ["localhost/web:1", "serve", "--port", "8080"]
    assert pc.env["CONTAINERS_STORAGE_CONF"] == str(tmp_path / "storage.conf")


async def test_service_output_is_followed_from_the_k8s_file_log(tmp_path: Path, capsys):
    import asyncio

    p = ComposeProject.parse(COMPOSE, "app", {"TOKEN": "t"})
    pc = PodmanCompose(p, storage_conf=tmp_path / "s.conf", volumes_dir=tmp_path / "vols")
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
