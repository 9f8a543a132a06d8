"""the compose parser: scalar-only interpolation, typed fields, and the sandbox policy."""

from __future__ import annotations

import json
import shlex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydstack.types.docker_compose import (
    DOCKER_DEFAULT_CAPS,
    PERMISSIVE,
    STRICT,
    ComposeError,
    ComposeProject,
    Mount,
    interpolate,
    load_document,
    split_command,
)


def parse(text: str, env: dict[str, str] | None = None, policy=STRICT) -> ComposeProject:
    return ComposeProject.parse(text, "app", env or {}, policy=policy)


def one(body: str, env: dict[str, str] | None = None, policy=STRICT):
    """the service `web` with `body` (indented service keys) added after its image."""
    return parse(f"services:\n  web:\n    image: localhost/web:1\n{body}", env, policy).services[0]


# -- interpolation ---------------------------------------------------------------------------


def test_interpolation_operators():
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("${SET} $SET ${MISSING} $$ $$SET", env) == "v v  $ $SET"
    assert interpolate("${EMPTY:-d} ${EMPTY-d} ${MISSING-d} ${SET:-d}", env) == "d  d v"
    assert interpolate("${SET:+a} ${EMPTY:+a}|${EMPTY+a} ${MISSING+a}|", env) == "a |a |"
    assert interpolate("${SET:?x} ${EMPTY?x}", env) == "v "
    assert interpolate("cost: $5, a lone $ and }", env) == "cost: $5, a lone $ and }"
    with pytest.raises(
        ComposeError, match="required variable MISSING is missing a value: 'set it'"
    ):
        interpolate("${MISSING:?set it}", env)
    with pytest.raises(ComposeError, match="required variable EMPTY"):
        interpolate("${EMPTY:?}", env)
    with pytest.raises(ComposeError, match="required variable MISSING"):
        interpolate("${MISSING?}", env)


def test_nested_defaults_are_interpolated_lazily():
    env = {"B": "b", "SET": "v"}
    assert interpolate("${A:-${B}}", env) == "b"
    assert interpolate("${A:-x${C:-${B}y}z}", env) == "xbyz"
    assert interpolate("${A:-{x}}", env) == "{x}"
    # a default that is not used is not evaluated, so its required variable does not fail
    assert interpolate("${SET:-${MISSING:?never}}", env) == "v"
    with pytest.raises(ComposeError, match="MISSING"):
        interpolate("${A:-${MISSING:?needed}}", env)
    deep = "${A:-" * 8 + "end" + "}" * 8
    assert interpolate(deep, env) == "end"
    with pytest.raises(ComposeError, match="nested too deeply"):
        interpolate("${A:-" * 9 + "end" + "}" * 9, env)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("${", "a variable name must follow"),
        ("${}", "a variable name must follow"),
        ("${1A}", "a variable name must follow"),
        ("${A", "expected }"),
        ("${A B}", "expected }"),
        ("${A:x}", "expected }"),
        ("${A:-unclosed", "unclosed"),
        ("x ${A:-${B:-y}", "unclosed"),
    ],
)
def test_malformed_interpolation_is_a_clear_error(text: str, message: str):
    with pytest.raises(ComposeError, match=message):
        interpolate(text, {})


def test_interpolation_of_large_hostile_input_is_linear_and_correct():
    size = 256 * 1024
    with pytest.raises(ComposeError, match=r"nested too deeply|unclosed"):
        interpolate("${A-" * (size // 4), {})
    assert interpolate("${A-}" * (size // 5), {}) == ""
    assert interpolate("${A-x}" * (size // 6), {}) == "x" * (size // 6)
    assert interpolate("$$" * (size // 2), {}) == "$" * (size // 2)
    with pytest.raises(ComposeError, match="unclosed"):
        interpolate("${A:-" + "x$" * (size // 2), {})


def test_interpolation_output_is_bounded():
    env = {"BIG": "x" * (1 << 20)}
    text = "services:\n  web:\n    image: i\n    environment:\n" + "".join(
        f"      V{i}: ${{BIG}}\n" for i in range(20)
    )
    with pytest.raises(ComposeError, match="more than 16777216 characters"):
        parse(text, env)


# -- env values cannot change the document's structure ---------------------------------------

HOSTILE = [
    "hi\n    privileged: true\n    entrypoint: [sh, -c]\n    command: [id]",
    "{a: 1}",
    "[1, 2]",
    "&anchor x",
    "*alias",
    "$$",
    "${OTHER}",
    "key: value",
    "- item",
    "# comment",
    "'quoted",
    '"double',
    "  leading and trailing  ",
    "",
]

TEMPLATE = """
services:
  web:
    image: localhost/web:1
    environment:
      V: ${X}
      W: "prefix ${X} suffix"
    command: ["echo", "${X}"]
    volumes:
      - data:/data
volumes:
  data:
"""


@pytest.mark.parametrize("value", HOSTILE)
def test_env_values_stay_one_string(value: str):
    web = parse(TEMPLATE, {"X": value, "OTHER": "other"}).services[0]
    assert web.environment == {"V": value, "W": f"prefix {value} suffix"}
    assert web.command == ["echo", value]
    assert web.privileged is False and web.entrypoint is None
    assert web.volumes == [Mount("volume", "data", "/data")]


def test_the_text_injection_of_the_old_interpolator_is_gone():
    text = "services:\n  web:\n    image: localhost/web:1\n    environment:\n      V: ${X}\n"
    env = {"X": "hi\n    privileged: true\n    entrypoint: [sh, -c]\n    command: [id]"}
    web = parse(text, env, PERMISSIVE).services[0]
    assert web.privileged is False and web.entrypoint is None and web.command is None
    assert web.environment == {"V": env["X"]}


def test_keys_are_not_interpolated():
    doc = load_document("services:\n  ${X}:\n    image: i\n", {"X": "web"})
    assert list(doc["services"]) == ["${X}"]  # type: ignore[call-overload]


def shape(value: object) -> object:
    """the structure of a document: keys and types, values erased."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return "str" if isinstance(value, str) else type(value).__name__


PROPERTY_COMPOSE = """
x-common: &common
  restart: ${RESTART:-always}
  environment:
    A: ${A}
    B: "${B:-b} and ${C}"
services:
  web:
    <<: *common
    image: localhost/web:1
    command: ["${A}", "$B", "${C:+c}"]
    entrypoint: ["sh", "-c", "${B}"]
    labels: {a: "${A}"}
    ports: ["${A}"]
"""


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["A", "B", "C", "RESTART"]), st.text(max_size=40)))
def test_random_env_values_never_change_the_structure(env: dict[str, str]):
    baseline = load_document(PROPERTY_COMPOSE, {k: "x" for k in env})
    assert shape(load_document(PROPERTY_COMPOSE, env)) == shape(baseline)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="\0"), max_size=60))
def test_random_env_values_reach_the_service_verbatim(value: str):
    web = parse(TEMPLATE, {"X": value}).services[0]
    assert web.environment["V"] == value and web.command == ["echo", value]
    assert web.volumes == [Mount("volume", "data", "/data")] and not web.privileged


# -- yaml limits through the parser ----------------------------------------------------------


def test_alias_bomb_in_environment_is_refused():
    lines = ['x-a: &a ["x","x","x","x","x","x","x","x","x"]']
    prev = "a"
    for name in "bcdefghi":
        lines.append(f"x-{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = name
    text = "\n".join(lines) + "\nservices:\n  web:\n    image: i\n    environment: *i\n"
    assert len(text) < 500
    with pytest.raises(ComposeError, match="more than 100000 nodes"):
        parse(text)


def test_size_and_depth_limits():
    with pytest.raises(ComposeError, match="exceeds"):
        parse("#" * (4 * 1024 * 1024 + 1))
    with pytest.raises(ComposeError, match=r"deeper than 64|nesting depth"):
        parse("services: " + "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ComposeError, match="deeper than 64"):
        one("    labels: " + "{a: " * 80 + "b" + "}" * 80 + "\n")


# -- typed fields ----------------------------------------------------------------------------


def test_fields_are_mapped():
    web = one(
        "    command: echo 'a b' c\n"
        "    entrypoint: [/bin/sh, -c]\n"
        "    environment: [A=1, B, C=x=y]\n"
        "    working_dir: /srv\n"
        "    user: 1000\n"
        "    restart: on-failure:3\n"
        "    privileged: 'false'\n"
        "    ports: [8080, '9000:9000', {target: 80}]\n"
        "    cap_drop: [ALL]\n"
        "    security_opt: [no-new-privileges:true]\n"
        "    ipc: private\n"
        "    network_mode: bridge\n"
        "    container_name: ignored\n"
        "    healthcheck: {test: [CMD, true]}\n"
        "    x-anything: {a: 1}\n"
    )
    assert web.command == ["echo", "a b", "c"]
    assert web.entrypoint == ["/bin/sh", "-c"]
    assert web.environment == {"A": "1", "B": "", "C": "x=y"}
    assert (web.working_dir, web.user, web.restart) == ("/srv", "1000", "on-failure:3")
    assert web.ports == ["8080", "9000:9000"]
    assert web.cap_drop == ["ALL"] and web.security_opt == ["no-new-privileges:true"]
    assert web.namespaces == {"ipc": "private"}


def test_depends_on_short_and_long_forms():
    base = "services:\n  db:\n    image: i\n  web:\n    image: i\n"
    p = parse(base + "    depends_on: [db]\n")
    assert [s.name for s in p.services] == ["db", "web"]
    p = parse(base + "    depends_on:\n      db: {condition: service_healthy, restart: true}\n")
    assert p.services[1].depends_on == ["db"]
    p = parse(base + "    depends_on: {db: null}\n")
    assert p.services[1].depends_on == ["db"]
    with pytest.raises(ComposeError, match="service web: depends_on: must be a list or a map"):
        parse(base + "    depends_on: 5\n")
    with pytest.raises(ComposeError, match=r"service web: depends_on.db: unsupported condition"):
        parse(base + "    depends_on: {db: {condition: whenever}}\n")
    with pytest.raises(ComposeError, match="depends on unknown service 'nope'"):
        parse(base + "    depends_on: {nope: {condition: service_started}}\n")


def test_a_long_number_is_cut_short_in_an_error_message():
    """a fuzzing finding: a number of up to 1000 digits (what the YAML loader lets through) in a
    wrong place was copied whole into the error message."""
    base = "services:\n  db:\n    image: i\n  web:\n    image: i\n"
    with pytest.raises(ComposeError) as e:
        parse(base + "    depends_on: {db: " + "1" * 1000 + "}\n")
    assert "must be a map, not 1111" in str(e.value) and len(str(e.value)) < 200
    with pytest.raises(ComposeError, match="is too long") as e:  # the loader's own bound
        parse(base + "    depends_on: {db: " + "1" * 1001 + "}\n")
    assert len(str(e.value)) < 200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('    command: "echo \'x"\n', "service web: command: cannot be split into words"),
        ("    command: 5\n", "service web: command: must be a string or a list"),
        ("    command: [echo, [x]]\n", "service web: command: must be a list of strings"),
        ("    command: [echo, true]\n", "service web: command: must be a list of strings"),
        ("    entrypoint: {a: b}\n", "service web: entrypoint: must be a string or a list"),
        ("    environment: [A=1, 5]\n", "service web: environment: items must be strings"),
        ("    environment: [[A, B]]\n", "service web: environment: items must be strings"),
        ("    environment: {A: [1]}\n", "service web: environment.A: must be a string"),
        ("    environment: {A: {b: c}}\n", "service web: environment.A: must be a string"),
        ("    environment: ['=x']\n", "service web: environment: invalid variable name"),
        ("    environment: 5\n", "service web: environment: must be a map or a list"),
        ('    environment: {A: "x\\0y"}\n', "service web: environment.A: must not contain NUL"),
        ("    volumes: [5]\n", "service web: volumes: entries must be strings or maps"),
        ("    volumes: [[a, b]]\n", "service web: volumes: entries must be strings or maps"),
        ("    volumes: data:/d\n", "service web: volumes: must be a list"),
        ("    working_dir: [x]\n", "service web: working_dir: must be a string"),
        ("    user: [x]\n", "service web: user: must be a user name or id"),
        ("    restart: sometimes\n", "service web: restart: 'sometimes' is not a restart"),
        ("    privileged: maybe\n", "service web: privileged: must be true or false"),
        ("    ports: 80\n", "service web: ports: must be a list"),
        ('    cap_drop: ["bad cap"]\n', "service web: cap_drop: invalid capability"),
        ("    network_mode: none\n", "service web: network_mode: 'none' is not supported"),
        ("    ipc: container:x\n", "service web: ipc: 'container:x' is not supported"),
    ],
)
def test_wrong_types_are_errors_naming_service_and_key(body: str, message: str):
    with pytest.raises(ComposeError, match=message):
        one(body)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("services: [", "not valid yaml"),
        ("- a\n- b\n", "must be a mapping"),
        ("services: {}\n", "no services"),
        ("services: [a]\n", "no services"),
        ("services:\n  a:\n    build: .\n", "build"),
        ("services:\n  a:\n    command: x\n", "no image"),
        ("services:\n  a:\n    image: [x]\n", "service a: image: must be a string"),
        ("services:\n  a:\n    image: --privileged\n", "is not an image reference"),
        ("services:\n  'bad name!':\n    image: x\n", "invalid service name"),
        ("services:\n  ~:\n    image: x\n", "invalid service name"),
        ("services:\n  ? [a]\n  : {image: x}\n", "keys must be strings"),
        ("services:\n  a: [x]\n", "service a must be a mapping"),
        ("services:\n  a:\n    image: x\n    volumes: [nope:/d]\n", "not declared"),
        ("services:\n  a:\n    image: x\n    volumes: ['./d:rel']\n", "must be an absolute"),
        ("services:\n  a:\n    image: x\n    volumes: [/d]\n", "anonymous"),
        ("services:\n  a:\n    image: x\n    depends_on: [b]\n", "unknown service 'b'"),
        ("services:\n  a:\n    image: x\nvolumes: [v]\n", "top-level volumes: must be a map"),
        ("services:\n  a:\n    image: x\nvolumes: {v: {driver_opts: {}}}\n", "driver_opts"),
        ("services:\n  a:\n    image: x\nconfigs: {}\n", "configs: not supported"),
        ('services:\n  a:\n    image: "x\\udfff"\n', "not valid yaml"),
        ("services:\n  a:\n    image: \udfff\n", "lone surrogate"),
        (
            "services:\n  a:\n    image: x\n    depends_on: [b]\n"
            "  b:\n    image: x\n    depends_on: [a]\n",
            "cycle",
        ),
    ],
)
def test_malformed_compose_is_a_clear_error(text: str, message: str):
    with pytest.raises(ComposeError, match=message):
        parse(text)


def test_error_messages_stay_short():
    big = "[" + ",".join(["x"] * 20_000) + "]"
    long = "k" * 100_000
    for body in (
        f"    command: [{big}]\n",
        f"    environment: [{big}]\n",
        f"    user: {big}\n",
        f"    {long}: 1\n",
        f"    environment: {{{long}: [1]}}\n",
        f"    depends_on: {{{long}: {{{long}: 1}}}}\n",
        f"    command: ${{{long}:?{long}}}\n",
        f"    command: ${{{long}\n",
        f"    volumes: [{{type: bind, source: ./a, target: /a, bind: {{{long}: 1}}}}]\n",
    ):
        with pytest.raises(ComposeError) as e:
            one(body)
        assert len(str(e.value)) < 300, str(e.value)[:400]


def test_error_messages_never_quote_env_values():
    secret = "s3cr3t-token"
    for body in (
        "    volumes: ['${S}:/x']\n",
        "    volumes: ['./a:/b:${S}']\n",
        "    restart: ${S}\n",
        "    cap_add: ['${S}']\n",
        "    network_mode: ${S}\n",
        "    environment: ['${S}']\n",
        "    security_opt: ['${S}']\n",
    ):
        with pytest.raises(ComposeError) as e:
            one(body, {"S": secret if "environment" not in body else "=" + secret})
        assert secret not in str(e.value), body
        assert "(a value from the env)" in str(e.value), body


# -- the sandbox policy ----------------------------------------------------------------------

REFUSED = [
    ("    privileged: true\n", "privileged"),
    ("    privileged: ${P}\n", "privileged"),
    ("    cap_add: [SYS_ADMIN]\n", "cap_add"),
    ("    cap_add: [cap_sys_module]\n", "cap_add"),
    ("    cap_add: [ALL]\n", "cap_add"),
    ("    devices: [/dev/sda:/dev/sda]\n", "devices"),
    ("    device_cgroup_rules: ['b 8:* rwm']\n", "device_cgroup_rules"),
    ("    pid: host\n", "pid"),
    ("    ipc: host\n", "ipc"),
    ("    uts: host\n", "uts"),
    ("    userns_mode: host\n", "userns_mode"),
    ("    cgroup: host\n", "cgroup"),
    ("    network_mode: host\n", "network_mode"),
    ("    network_mode: container:other\n", "network_mode"),
    ("    network_mode: service:other\n", "network_mode"),
    ("    security_opt: [seccomp=unconfined]\n", "security_opt"),
    ("    security_opt: ['seccomp:unconfined']\n", "security_opt"),
    ("    security_opt: [apparmor=unconfined]\n", "security_opt"),
    ("    security_opt: ['label=disable']\n", "security_opt"),
    ("    security_opt: [systempaths=unconfined]\n", "security_opt"),
    ("    sysctls: {kernel.shm_rmid_forced: 1}\n", "sysctls"),
    ("    volumes_from: [other]\n", "volumes_from"),
    ("    env_file: .env\n", "env_file"),
    ("    secrets: [s]\n", "secrets"),
    ("    volumes: ['/:/host']\n", "volumes"),
    ("    volumes: ['/etc:/etc:ro']\n", "volumes"),
    ("    volumes: ['${ROOT}:/host']\n", "volumes"),
    ("    volumes: ['/var/run/dstack:/d']\n", "volumes"),
    ("    volumes: ['/run/dstack:/d']\n", "volumes"),
    ("    volumes: ['/var/run/docker.sock:/var/run/docker.sock']\n", "volumes"),
    ("    volumes: ['~/x:/x']\n", "volumes"),
    ("    volumes: ['../x:/x']\n", "volumes"),
    ("    volumes: ['./a/../../x:/x']\n", "volumes"),
    ("    volumes: ['./a:/a:shared']\n", "volumes"),
    ("    volumes: [{type: bind, source: /, target: /host}]\n", "volumes"),
    ("    volumes: [{type: bind, source: ../up, target: /x}]\n", "volumes"),
    (
        "    volumes: [{type: bind, source: ./a, target: /a, bind: {propagation: rshared}}]\n",
        "volumes",
    ),
    ("    volumes: [{type: npipe, source: x, target: /x}]\n", "volumes"),
    ("    volumes: [{type: bind, source: ./a, target: /a, oops: 1}]\n", "volumes"),
]


@pytest.mark.parametrize(("body", "key"), REFUSED)
def test_strict_policy_refuses_escapes(body: str, key: str):
    env = {"P": "true", "ROOT": "/"}
    with pytest.raises(ComposeError, match=f"service web: {key}"):
        one(body, env)


def test_permissive_policy_applies_what_strict_refuses():
    web = one(
        "    privileged: true\n"
        "    cap_add: [SYS_ADMIN, CAP_net_admin]\n"
        "    devices: [/dev/fuse]\n"
        "    pid: host\n"
        "    network_mode: host\n"
        "    security_opt: [seccomp=unconfined]\n"
        "    sysctls: [net.core.somaxconn=1024]\n"
        "    volumes: ['/srv:/srv:ro']\n"
        "    volumes_from: [other]\n",
        policy=PERMISSIVE,
    )
    assert web.privileged and web.cap_add == ["SYS_ADMIN", "NET_ADMIN"]
    assert web.devices == ["/dev/fuse"] and web.namespaces == {"pid": "host"}
    assert web.security_opt == ["seccomp=unconfined"]
    assert web.sysctls == {"net.core.somaxconn": "1024"}
    assert web.volumes == [Mount("host", "/srv", "/srv", True)]


def test_strict_policy_accepts_the_safe_subset():
    web = one(
        "    cap_add: [NET_BIND_SERVICE, cap_chown, CAP_KILL]\n"
        "    security_opt: [no-new-privileges]\n"
        "    privileged: false\n"
        "    volumes:\n"
        "      - /var/run/dstack.sock:/var/run/dstack.sock\n"
        "      - /run/tappd.sock:/var/run/tappd.sock:ro\n"
        "      - ./data:/data\n"
        "      - ./a/./b/../c:/c:rw\n"
        "      - .:/all\n"
        "      - data:/vol:ro,nocopy\n"
        "      - {type: bind, source: conf/x, target: /x, read_only: true,"
        " bind: {propagation: rprivate}}\n"
        "      - {type: volume, source: data, target: /v2, volume: {nocopy: true}}\n"
        "      - {type: tmpfs, target: /tmp, tmpfs: {size: 64m, mode: 0o1777}}\n"
        "volumes:\n  data: {driver: local, labels: {a: b}}\n"
    )
    assert web.cap_add == ["NET_BIND_SERVICE", "CHOWN", "KILL"]
    assert web.volumes == [
        Mount("socket", "/var/run/dstack.sock", "/var/run/dstack.sock"),
        Mount("socket", "/run/tappd.sock", "/var/run/tappd.sock", True),
        Mount("bind", "data", "/data"),
        Mount("bind", "a/c", "/c"),
        Mount("bind", ".", "/all"),
        Mount("volume", "data", "/vol", True, ("nocopy",)),
        Mount("bind", "conf/x", "/x", True, ("rprivate",)),
        Mount("volume", "data", "/v2", False, ("nocopy",)),
        Mount("tmpfs", "", "/tmp", False, ("size=64m", "mode=1777")),
    ]


def test_unknown_keys_strict_refuses_permissive_ignores(caplog):
    text = "services:\n  web:\n    image: i\n    extra_hosts: [a:1.2.3.4]\n"
    with pytest.raises(ComposeError, match="service web: extra_hosts: not supported"):
        parse(text)
    assert parse(text, policy=PERMISSIVE).services[0].name == "web"
    assert "extra_hosts" in caplog.text


def test_the_vmm_and_the_guest_refuse_the_same(tmp_path):
    from pydstack.vmm.validate import InvalidCompose, validate_app_compose

    def app(dc: str) -> str:
        return json.dumps({"name": "a", "runner": "docker-compose", "docker_compose_file": dc})

    ok = "services:\n  web:\n    image: i\n    volumes: [/run/dstack.sock:/var/run/dstack.sock]\n"
    assert validate_app_compose(app(ok))["name"] == "a"
    for body, key in REFUSED:
        if "${" in body:
            continue  # the vmm does not know the env; the guest checks those at boot
        dc = f"services:\n  web:\n    image: localhost/web:1\n{body}"
        with pytest.raises(InvalidCompose, match=f"invalid docker compose: service web: {key}"):
            validate_app_compose(app(dc))
    with pytest.raises(InvalidCompose, match="more than 100000 nodes"):
        bomb = "x-a: &a [" + ",".join(["x"] * 100) + "]\nx-b: [" + ",".join(["*a"] * 2000) + "]\n"
        validate_app_compose(app(bomb + "services: {web: {image: i}}\n"))
    with pytest.raises(InvalidCompose, match="lone surrogate"):
        validate_app_compose('{"docker_compose_file": "\udfff"}')
    # an escaped one: the app-compose json refuses it before the yaml sees it
    with pytest.raises(InvalidCompose, match=r"invalid app compose: .*lone surrogate"):
        validate_app_compose('{"docker_compose_file": "a: \\udfff"}')


# -- command strings -------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="ab '\"\\\t\n\r\x0b\u00a0$#", max_size=30))
def test_command_strings_split_like_shlex(text: str):
    try:
        expected = shlex.split(text)
    except ValueError:
        with pytest.raises(ValueError):
            split_command(text)
        return
    assert split_command(text) == expected


def test_command_splitting_is_linear_on_long_words():
    # shlex grows a word a character at a time (quadratic: minutes for 4 MiB)
    n = 2 * 1024 * 1024
    assert split_command("x" * n) == ["x" * n]
    assert split_command('"' + "\\\\" * n + '"') == ["\\" * n]
    assert split_command("a " * n) == ["a"] * n
    with pytest.raises(ValueError, match="no closing quotation"):
        split_command('"' + "x" * n)
    with pytest.raises(ValueError, match="trailing backslash"):
        split_command("x" * n + "\\")


# -- fuzzing: only ComposeError comes out ----------------------------------------------------

SERVICE_FIELD = st.sampled_from(
    ["command", "entrypoint", "environment", "volumes", "depends_on", "ports", "user",
     "restart", "privileged", "cap_add", "security_opt", "network_mode", "ipc", "sysctls",
     "devices", "working_dir", "image", "labels", "x-a"]
)  # fmt: skip
YAML_VALUE = st.one_of(
    st.sampled_from(
        ["true", "'1'", "host", "[SYS_ADMIN]", "[/:/h]", "['${A}:/h']", "${A}", "[/dev/sda]",
         "[seccomp=unconfined]", "{a: 1}", "[a=b]", "container:x"]
    ),
    st.text(alphabet="ab1 :-[]{},&*!'\"#?~./$=\\", max_size=40),
)  # fmt: skip
ENV_VALUE = st.one_of(st.sampled_from(["true", "/", "host", "SYS_ADMIN"]), st.text(max_size=10))


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.tuples(SERVICE_FIELD, YAML_VALUE), max_size=4), ENV_VALUE)
def test_any_service_fields_parse_or_raise_compose_error(fields, env_value: str):
    body = "".join(f"    {k}: {v}\n" for k, v in dict(fields).items())
    text = f"services:\n  web:\n    image: i\n{body}"
    for policy in (STRICT, PERMISSIVE):
        try:
            project = ComposeProject.parse(text, "app", {"A": env_value}, policy=policy)
        except ComposeError as e:
            assert len(str(e)) < 400
            continue
        if policy is STRICT:  # whatever got through stays inside the sandbox's rules
            web = project.services[0]
            assert not web.privileged and not web.devices and not web.sysctls
            assert set(web.cap_add) <= DOCKER_DEFAULT_CAPS
            assert "host" not in web.namespaces.values()
            assert all(m.kind != "host" for m in web.volumes)


def test_aliased_nodes_are_interpolated_once(monkeypatch):
    # a fuzzing finding: 292 bytes of nested aliases (50,000 nodes, within MAX_NODES) were
    # copied node by node for interpolation, 0.2 s per parse; shared nodes stay shared now
    from pydstack.types import docker_compose

    laughs = "a: &a ['${A}', x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcd", "bcde", strict=True)
    )
    calls = []
    real = docker_compose.interpolate
    monkeypatch.setattr(
        docker_compose, "interpolate", lambda text, *a: calls.append(text) or real(text, *a)
    )
    doc = docker_compose.load_document(laughs, {"A": "1"})
    assert doc["e"][8][8][8][8][0] == "1"
    assert doc["e"][0] is doc["e"][8]  # shared, as the loader shares it
    assert len(calls) == 9  # the nine strings of `a`, once each
