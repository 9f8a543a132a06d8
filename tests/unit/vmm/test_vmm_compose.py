"""the dstack cli's app-compose writer and argument parsers."""

from __future__ import annotations

import hashlib
import json

import pytest

from pydstack.vmm.compose import (
    ArgError,
    app_id_of,
    compose_bytes,
    compose_hash,
    make_app_compose,
    parse_disk_gb,
    parse_env_file,
    parse_memory_mb,
    parse_port,
)


def test_app_compose_bytes_follow_vmm_cli_order():
    doc = make_app_compose(
        name="web",
        docker_compose="services:\n  app:\n    image: busybox\n",
        kms=True,
        allowed_envs=["API_KEY"],
        prelaunch_script="echo hi",
        swap_bytes=1 << 30,
        event_log_version=2,
        key_provider="kms",
    )
    raw = compose_bytes(doc)
    assert list(json.loads(raw)) == [
        "manifest_version",
        "name",
        "runner",
        "docker_compose_file",
        "kms_enabled",
        "gateway_enabled",
        "local_key_provider_enabled",
        "key_provider_id",
        "public_logs",
        "public_sysinfo",
        "allowed_envs",
        "no_instance_id",
        "secure_time",
        "key_provider",
        "pre_launch_script",
        "swap_size",
        "event_log_version",
    ]
    assert raw.startswith(b'{\n    "manifest_version": 2,\n    "name": "web",')
    assert compose_hash(raw) == hashlib.sha256(raw).hexdigest()
    assert app_id_of(raw) == compose_hash(raw)[:40]
    plain = json.loads(compose_bytes(make_app_compose(name="x", docker_compose="")))
    assert (
        "swap_size" not in plain
        and "event_log_version" not in plain
        and "key_provider" not in plain
    )
    assert compose_bytes(make_app_compose(name="ü", docker_compose="")).count("ü".encode()) == 1


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"name": ""}, "needs a name"),
        ({"key_provider": "sgx"}, "key provider must be"),
        ({"key_provider_id": "xyz"}, "must be hex"),
        ({"event_log_version": 3}, "1 or 2"),
    ],
)
def test_app_compose_rejects_bad_values(kw, msg):
    args = {"name": "x", "docker_compose": "", **kw}
    with pytest.raises(ArgError, match=msg):
        make_app_compose(**args)


def test_sizes():
    assert parse_memory_mb("1024") == 1024
    assert parse_memory_mb("2G") == 2048 and parse_memory_mb("512MB") == 512
    assert parse_memory_mb("1.5G") == 1536 and parse_memory_mb("1T") == 1024 * 1024
    assert parse_disk_gb("20") == 20 and parse_disk_gb("1T") == 1024
    for bad in ("", "abc", "1.3M", "0", "5X", "-1G"):
        with pytest.raises(ArgError):
            parse_memory_mb(bad)
    with pytest.raises(ArgError):
        parse_disk_gb("512M")


def test_ports_and_env_files():
    p = parse_port("tcp:8080:80")
    assert (p.protocol, p.address, p.host_port, p.vm_port) == ("tcp", "127.0.0.1", 8080, 80)
    assert parse_port("udp:0.0.0.0:53:5353").address == "0.0.0.0"
    for bad in ("tcp:80", "icmp:1:2", "tcp:x:80", "tcp:0:80", "tcp:1:70000"):
        with pytest.raises(ArgError):
            parse_port(bad)
    text = "# comment\nA = 1\nB=two=2\nnot a pair\n\n C=  spaced  \n"
    assert parse_env_file(text) == [("A", "1"), ("B", "two=2"), ("C", "spaced")]
