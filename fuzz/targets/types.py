"""targets of `pydstack.types`: the bounded JSON and YAML loaders, docker compose, app-compose
and sys-config."""

from __future__ import annotations

import json
from collections.abc import Sequence

from fuzz import mutators as m
from fuzz.harness import Target
from fuzz.targets import common as c
from pydstack.types import jsonlimits, yamllimits
from pydstack.types.app_compose import AppCompose, AppComposeError
from pydstack.types.docker_compose import (
    DOCKER_DEFAULT_CAPS,
    PERMISSIVE,
    STRICT,
    ComposeError,
    ComposeProject,
)
from pydstack.types.sysconfig import SysConfig, SysConfigError


def shape(value: object, depth: int = 1) -> tuple[int, int]:
    """(nesting depth of containers, number of values) of a decoded document; aliased YAML
    nodes count once per place they appear."""
    if isinstance(value, dict):
        items = [shape(v, depth + 1) for v in value.values()]
    elif isinstance(value, list):
        items = [shape(v, depth + 1) for v in value]
    else:
        return depth - 1, 1
    deepest = max((d for d, _ in items), default=depth)
    return max(deepest, depth), 1 + sum(n for _, n in items)


# -- JSON ----------------------------------------------------------------------------------

SMALL_JSON = {"max_depth": 8, "max_items": 64, "max_bytes": 4096}


def _json(data: bytes) -> None:
    for doc in (data, c.text(data)):
        c.refusing((jsonlimits.JsonError,), jsonlimits.loads, doc)
        small = c.refusing((jsonlimits.JsonError,), jsonlimits.loads, doc, **SMALL_JSON)
        if small is not None:
            depth, items = shape(small)
            assert depth <= SMALL_JSON["max_depth"], f"loads returned depth {depth}"
            # max_items bounds the values besides the top-level one
            assert items - 1 <= SMALL_JSON["max_items"], f"loads returned {items} values"


JSON_SEEDS = [
    ("object", b'{"a": [1, 2.5, -3e4, true, null, "x\\u00e9\\n"], "b": {"c": {}}}'),
    ("nested", b"[[[[[[[[1]]]]]]]]"),
    ("strings", b'["\\"[{", "\\\\", "]}", "\\ud83d\\ude00"]'),
    ("bom", b'\xef\xbb\xbf{"k": "v"}'),
    ("number", b"123456789012345678901234567890"),
]

JSONLIMITS = Target(
    name="jsonlimits",
    doc="`types/jsonlimits.py::loads` (bytes and str) with the default limits and small ones, "
    "and that what it returns is within the limits",
    make=lambda: _json,
    allowed=(),
    seeds=lambda: JSON_SEEDS,
    mutators=m.JSON,
    tokens=(b'"\\u', b"\\\\", b'\\"', b"[", b"{", b"]", b"}", b",", b"1e999", b"NaN", b"-Infinity"),
    max_len=16 * 1024,
    calls=4,
)

# -- YAML ----------------------------------------------------------------------------------

SMALL_YAML = {"max_bytes": 4096, "max_nodes": 200, "max_depth": 8}


def _check_yaml(value: object, depth: int = 0) -> None:
    assert depth <= 64
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str), f"yaml key of type {type(k).__name__}"
            _check_yaml(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_yaml(v, depth + 1)
    else:
        assert value is None or isinstance(value, bool | int | float | str), type(value)


def _yaml(data: bytes) -> None:
    for doc in (data, c.text(data)):
        c.refusing((yamllimits.YamlError,), yamllimits.load, doc)
        small = c.refusing((yamllimits.YamlError,), yamllimits.load, doc, **SMALL_YAML)
        if small is not None:
            _check_yaml(small)
            depth, nodes = shape(small)
            assert depth <= SMALL_YAML["max_depth"], f"load returned depth {depth}"
            assert nodes <= SMALL_YAML["max_nodes"], f"load returned {nodes} nodes"


YAML_SEEDS = [
    ("mapping", b"a: 1\nb: [x, 'y', \"z\"]\nc:\n  d: ~\n  e: 0x1F\n  f: .inf\n"),
    ("anchors", b"base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  y: 3\nlist: [*b, *b]\n"),
    ("tags", b"a: !!str 1\nb: !!int '2'\nc: !!float 1.5\nd: !!bool true\ne: !!null ''\n"),
    ("block", b"text: |\n  line1\n  line2\nfolded: >-\n  a\n  b\n"),
    ("merge-list", b"a: &a {k: 1}\nb: &b {l: 2}\nc:\n  <<: [*a, *b]\n"),
]

YAMLLIMITS = Target(
    name="yamllimits",
    doc="`types/yamllimits.py::load` (bytes and str) with the default limits and small ones: "
    "only plain types and str keys come back, within the node and depth limits",
    make=lambda: _yaml,
    allowed=(),
    seeds=lambda: YAML_SEEDS,
    mutators=m.YAML,
    tokens=(b"&a", b"*a", b"<<: ", b"!!", b"- ", b": ", b"? ", b"|", b">", b"---", b"\n  "),
    max_len=16 * 1024,
    calls=4,
)

# -- docker compose ------------------------------------------------------------------------

#: the app's decrypted env (hostile: it tries to add keys, nest, and expand)
COMPOSE_ENV = {
    "A": "x\n  privileged: true",
    "B": "${A}",
    "CAP": "SYS_ADMIN",
    "PATH_ROOT": "/",
    "HOST": "host",
    "EMPTY": "",
    "LONG": "y" * 4096,
}


def _compose(data: bytes) -> None:
    text = c.text(data)
    for policy in (STRICT, PERMISSIVE):
        try:
            project = ComposeProject.parse(text, "app", COMPOSE_ENV, policy=policy)
        except ComposeError as e:
            assert len(str(e)) < 1000, "a compose error message is too long"
            assert "y" * 200 not in str(e), "a compose error quotes an env value"
            continue
        if policy is STRICT:  # what got through stays inside the sandbox's rules
            for s in project.services:
                assert not s.privileged and not s.devices and not s.sysctls
                assert not s.device_cgroup_rules
                assert set(s.cap_add) <= DOCKER_DEFAULT_CAPS, s.cap_add
                assert "host" not in s.namespaces.values()
                assert all(v.kind != "host" for v in s.volumes)


COMPOSE_SEEDS = [
    (
        "web",
        b"services:\n  web:\n    image: nginx:1.25\n    ports: ['8080:80']\n"
        b"    environment:\n      - A=${A}\n      - B\n    command: sh -c 'echo \"$${HOME}\"'\n"
        b"    restart: on-failure:3\n",
    ),
    (
        "volumes",
        b"services:\n  app:\n    image: app\n    volumes:\n      - data:/data\n"
        b"      - ./conf:/etc/conf:ro\n      - /var/run/dstack.sock:/var/run/dstack.sock\n"
        b"      - type: tmpfs\n        target: /tmp\n        tmpfs: {size: 1m, mode: 0o1777}\n"
        b"      - type: bind\n        source: ./x\n        target: /x\n"
        b"        bind: {propagation: rprivate}\nvolumes:\n  data: {}\n",
    ),
    (
        "depends",
        b"x-base: &base\n  image: busybox\n  cap_drop: [ALL]\n  security_opt: [no-new-privileges]\n"
        b"services:\n  a:\n    <<: *base\n    depends_on: {b: {condition: service_healthy}}\n"
        b"  b:\n    <<: *base\n    entrypoint: ['/bin/sh', '-c']\n    user: '1000'\n"
        b"    cap_add: [CHOWN, CAP_NET_RAW]\n    ipc: private\n",
    ),
    (
        "interpolation",
        b"services:\n  s:\n    image: ${IMG:-busybox}\n    working_dir: ${W-/w}\n"
        b"    environment: {X: '${CAP:+yes}', Y: '${MISSING:?needs it}', Z: 1, T: true}\n",
    ),
]

COMPOSE_KEYS = (
    "services", "image", "command", "entrypoint", "environment", "volumes", "ports",
    "privileged", "cap_add", "devices", "network_mode", "pid", "ipc", "userns_mode",
    "security_opt", "sysctls", "depends_on", "build", "user", "restart", "tmpfs", "type",
    "source", "target", "bind", "propagation", "x-a",
)  # fmt: skip

COMPOSE = Target(
    name="compose",
    doc="`types/docker_compose.py::ComposeProject.parse` with a hostile env, under the strict "
    "and the permissive policy; nothing the strict policy refuses gets through",
    make=lambda: _compose,
    allowed=(),
    seeds=lambda: COMPOSE_SEEDS,
    mutators=m.YAML,
    tokens=(
        *(k.encode() + b": " for k in COMPOSE_KEYS),
        *(b"${", b"$$", b":-", b":?", b":+", b"host", b"SYS_ADMIN", b"/:/host", b"../"),
    ),
    max_len=16 * 1024,
    calls=2,
)

# -- app-compose and sys-config ------------------------------------------------------------


def _app_compose(data: bytes) -> None:
    for raw in (data, c.text(data)):
        app = c.refusing((AppComposeError,), AppCompose.parse, raw)
        if app is None:
            continue
        _ = app.compose_hash, app.name, app.runner, app.key_provider
        c.refusing((AppComposeError,), lambda a=app: a.init_scripts)
        c.refusing((AppComposeError,), lambda a=app: a.docker_compose_file)
        c.refusing((AppComposeError,), lambda a=app: a.key_provider_id)
        c.refusing((AppComposeError,), lambda a=app: a.allowed_envs)
        c.refusing((AppComposeError,), app.check_policy)
        app.flag("public_logs")


APP_COMPOSE_SEEDS = [
    ("simulator", c.vector("dstack/simulator_app-compose.json")),
    (
        "v3",
        json.dumps(
            {
                "manifest_version": 3,
                "name": "n",
                "runner": "nerdctl-compose",
                "docker_compose_file": "services: {}",
                "key_provider": "kms",
                "key_provider_id": "0xabcd",
                "allowed_envs": ["A"],
                "init_script": ["a", "b"],
                "requirements": {},
                "public_logs": True,
            }
        ).encode(),
    ),
    ("legacy-flags", b'{"manifest_version": "2", "name": "x", "kms_enabled": true}'),
]

APP_COMPOSE = Target(
    name="app_compose",
    doc="`types/app_compose.py::AppCompose.parse` (bytes and str), every field accessor and "
    "`check_policy`",
    make=lambda: _app_compose,
    allowed=(),
    seeds=lambda: APP_COMPOSE_SEEDS,
    mutators=m.JSON,
    tokens=tuple(
        f'"{k}"'.encode()
        for k in (
            "manifest_version",
            "name",
            "runner",
            "docker_compose_file",
            "key_provider",
            "key_provider_id",
            "allowed_envs",
            "init_script",
            "requirements",
            "kms_enabled",
            "local_key_provider_enabled",
            "bash",
            "nerdctl-compose",
        )
    ),
    max_len=16 * 1024,
    calls=2,
)


def _sys_config(data: bytes) -> None:
    for raw in (data, c.text(data)):
        sc = c.refusing((SysConfigError,), SysConfig.from_json, raw)
        if sc is None:
            continue
        _ = sc.vm_config_obj, sc.os_image_hash
        assert SysConfig.from_json(sc.to_json()) == sc, "a sys-config does not round-trip"


SYS_CONFIG = Target(
    name="sys_config",
    doc="`types/sysconfig.py::SysConfig.from_json` (bytes and str), its vm_config accessors "
    "and a round trip through `to_json`",
    make=lambda: _sys_config,
    allowed=(),
    seeds=lambda: [
        ("simulator", c.vector("dstack/simulator_sys-config.json")),
        ("vm-config-object", b'{"kms_urls": ["a"], "vm_config": {"os_image_hash": "00"}}'),
    ],
    mutators=m.JSON,
    tokens=tuple(
        f'"{k}"'.encode()
        for k in (
            "kms_urls",
            "gateway_urls",
            "pccs_url",
            "docker_registry",
            "host_api_url",
            "vm_config",
            "os_image_hash",
        )
    ),
    max_len=16 * 1024,
    calls=4,
)

TARGETS: Sequence[Target] = (JSONLIMITS, YAMLLIMITS, COMPOSE, APP_COMPOSE, SYS_CONFIG)
