"""an app's docker-compose file, parsed for the in-CVM runner: YAML, interpolation, policy.

The contract of `ComposeProject.parse(text, project, env, policy=STRICT)`:

- the YAML is read by `pydstack.yamllimits` with at most `MAX_COMPOSE` bytes, `MAX_NODES`
  nodes (aliases counted as expanded) and `MAX_DEPTH` levels; at most `MAX_SERVICES` services.
- `${VAR}` and friends are substituted from `env` (the app's decrypted env, never the host's)
  only inside string *values* of the parsed document, never in keys and never in the YAML
  text: whatever an env value holds (newlines, `{`, `&anchor`, `- item`), it stays one
  string and cannot add keys. Substitutions produce at most `MAX_INTERPOLATED` characters.
- every field the runner reads is type-checked, and the policy decides what a service may ask
  for (see `ComposePolicy`); unknown keys are refused under the strict policy.
- every bad input raises `ComposeError` (a ValueError) naming the service and the key. Error
  messages quote at most ~100 characters of the compose file and never a value that came from
  the env (those may be secrets).

Worst case: linear in the input size (YAML loading, interpolation and command splitting are
single passes, and interpolation visits a node an alias shares once); a 4 MiB file packed with
`$` takes about a second. The result shares aliased nodes as the YAML loader's does.
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydstack.errors import InputError
from pydstack.types import yamllimits
from pydstack.types.yamllimits import YamlValue

log = logging.getLogger(__name__)
MAX_COMPOSE = 4 * 1024 * 1024
MAX_NODES = 100_000
MAX_DEPTH = 64
MAX_SERVICES = 64
MAX_INTERPOLATION_NESTING = 8
MAX_INTERPOLATED = 16 * 1024 * 1024
AGENT_SOCKETS = frozenset(
    {"/var/run/dstack.sock", "/run/dstack.sock", "/var/run/tappd.sock", "/run/tappd.sock"}
)
DOCKER_DEFAULT_CAPS = frozenset(
    {
        "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
        "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
    }
)  # fmt: skip
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}\Z")
_IMAGE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._/:@+-]{0,511}\Z")
_CAP = re.compile(r"(?:CAP_)?([A-Z][A-Z0-9_]{0,31})\Z", re.IGNORECASE)
_RESTART = re.compile(r"(?:no|always|unless-stopped|on-failure(?::[0-9]{1,4})?)\Z")
_VAR_START = re.compile(r"[A-Za-z_]")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOLLAR = re.compile(r"\$")
_DOLLAR_OR_CLOSE = re.compile(r"[$}]")
_WORD_PIECE = re.compile(
    r"""([ \t\r\n]++)|'([^']*+)'|"((?:[^"\\]++|\\.)*+)"|\\(.)|([^ \t\r\n'"\\]++)""",
    re.DOTALL,
)
_QUOTED_ESCAPE = re.compile(r'\\(["\\])')
_TRUE = frozenset({"1", "t", "T", "true", "True", "TRUE"})  # Go's strconv.ParseBool
_FALSE = frozenset({"0", "f", "F", "false", "False", "FALSE"})
_NAMESPACE_FLAGS = {
    "pid": "pid", "ipc": "ipc", "uts": "uts", "userns_mode": "userns", "cgroup": "cgroupns"
}  # fmt: skip
_PRIVATE_NAMESPACES = {"ipc": {"private", "shareable", "none"}, "cgroup": {"private"}}
_IGNORED_KEYS = frozenset(
    {
        "container_name", "labels", "healthcheck", "logging", "stop_grace_period", "expose",
        "hostname", "tty", "stdin_open", "init", "deploy", "networks", "build", "stop_signal",
        "mem_limit", "mem_reservation", "memswap_limit", "cpus", "cpu_shares", "shm_size",
        "platform", "pull_policy",
    }
)  # fmt: skip
_TOP_KEYS = frozenset({"version", "name", "services", "volumes", "networks"})
_MOUNT_OPTIONS = frozenset({"ro", "rw", "private", "rprivate", "nocopy"})


class ComposeError(InputError):
    """the docker-compose file cannot be run."""


# -- interpolation ---------------------------------------------------------------------------


class Interpolated(str):
    """a string a substitution produced: it may hold env values, so errors never quote it."""

    __slots__ = ()


class _Budget:
    def __init__(self, limit: int = MAX_INTERPOLATED) -> None:
        self.left = limit

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise ComposeError(f"interpolation produces more than {MAX_INTERPOLATED} characters")


class _Interpolator:
    """one left-to-right pass over a string; nested defaults recurse at most a few levels."""

    def __init__(self, text: str, env: Mapping[str, str], budget: _Budget) -> None:
        self.text = text
        self.env = env
        self.budget = budget
        self.substituted = False

    def fail(self, start: int, why: str) -> ComposeError:
        return ComposeError(f"{why} in {yamllimits.quote(self.text[start:], 60)}")

    def run(self) -> str:
        out, _ = self.scan(0, 0, live=True)
        return out

    def scan(self, pos: int, nesting: int, *, live: bool) -> tuple[str, int]:
        """text from `pos`; inside a `${...}` (nesting > 0) up to its `}`, returned past it."""
        text, parts = self.text, []
        special = _DOLLAR_OR_CLOSE if nesting else _DOLLAR
        while True:
            m = special.search(text, pos)
            if m is None:
                if nesting:
                    raise self.fail(pos, "unclosed ${")
                parts.append(text[pos:])
                return "".join(parts), len(text)
            i = m.start()
            parts.append(text[pos:i])
            if text[i] == "}":
                return "".join(parts), i + 1
            nxt = text[i + 1 : i + 2]
            if nxt == "$":
                parts.append("$")
                pos = i + 2
            elif nxt == "{":
                value, pos = self.braced(i, nesting, live=live)
                parts.append(value)
            elif _VAR_START.match(nxt):
                name = _VAR_NAME.match(text, i + 1)
                assert name is not None
                parts.append(self.lookup(name.group(), live) or "")
                pos = name.end()
            else:  # a lone `$` is kept, as docker compose does
                parts.append("$")
                pos = i + 1

    def lookup(self, name: str, live: bool) -> str | None:
        value = self.env.get(name)
        if live and value:
            self.substituted = True
            self.budget.spend(len(value))
        return value

    def braced(self, start: int, nesting: int, *, live: bool) -> tuple[str, int]:
        text = self.text
        name_m = _VAR_NAME.match(text, start + 2)
        if name_m is None:
            raise self.fail(start, "invalid interpolation (a variable name must follow ${)")
        name, pos = name_m.group(), name_m.end()
        if text.startswith("}", pos):
            return self.lookup(name, live) or "", pos + 1
        op = text[pos : pos + 2] if text.startswith(":", pos) else text[pos : pos + 1]
        if op not in (":-", "-", ":?", "?", ":+", "+"):
            raise self.fail(start, "invalid interpolation (expected }, :-, -, :?, ?, :+ or +)")
        if nesting + 1 > MAX_INTERPOLATION_NESTING:
            raise self.fail(start, "interpolation nested too deeply")
        value = self.env.get(name)
        unset = value is None or (op.startswith(":") and value == "")
        use_arg = unset if op[-1] in "-?" else not unset
        arg_start = pos + len(op)
        # an error message (`?`) is quoted as written, never evaluated
        arg, end = self.scan(arg_start, nesting + 1, live=live and use_arg and op[-1] != "?")
        if not live:
            return "", end
        if op[-1] == "?":
            if unset:
                why = yamllimits.quote(text[arg_start : end - 1], 60)
                raise ComposeError(f"required variable {_k(name)} is missing a value: {why}")
            return self.lookup(name, live) or "", end
        if use_arg:
            return arg, end
        return ("" if op[-1] == "+" else self.lookup(name, live) or ""), end


def interpolate(text: str, env: Mapping[str, str], budget: _Budget | None = None) -> str:
    """`text` with `$VAR`, `${VAR}`, `${VAR:-d}`, `${VAR-d}`, `${VAR:?e}`, `${VAR?e}`,
    `${VAR:+a}`, `${VAR+a}` substituted from `env` and `$$` made `$`.

    Defaults may nest further substitutions (up to MAX_INTERPOLATION_NESTING levels). An unset
    variable without a default becomes "". A malformed or unclosed `${`, or a missing required
    variable, raises ComposeError. One left-to-right pass: time linear in len(text) plus the
    output. The result is an `Interpolated` str when an env value was substituted.
    """
    if "$" not in text:
        return text
    scanner = _Interpolator(text, env, budget or _Budget())
    out = scanner.run()
    return Interpolated(out) if scanner.substituted else out


def _interpolate_values(
    value: YamlValue,
    env: Mapping[str, str],
    budget: _Budget,
    done: dict[int, YamlValue] | None = None,
) -> YamlValue:
    """a copy of the document with every string value interpolated (keys untouched).

    A list or mapping the YAML shares through an alias is interpolated once and the copy
    shared the same way (`done`, by identity), so the walk is linear in the document's text:
    a few hundred bytes of nested aliases expand to 100,000 nodes, which copying each time
    would visit one by one."""
    if isinstance(value, str):
        return interpolate(value, env, budget)
    if not isinstance(value, list | dict):
        return value
    done = {} if done is None else done
    copy = done.get(id(value))
    if copy is None:
        if isinstance(value, list):
            copy = [_interpolate_values(v, env, budget, done) for v in value]
        else:
            copy = {k: _interpolate_values(v, env, budget, done) for k, v in value.items()}
        done[id(value)] = copy
    return copy


def load_document(text: str, env: Mapping[str, str]) -> dict[str, YamlValue]:
    """the compose file as a bounded YAML mapping with its values interpolated."""
    try:
        doc = yamllimits.load(text, max_bytes=MAX_COMPOSE, max_nodes=MAX_NODES, max_depth=MAX_DEPTH)
    except yamllimits.YamlError as e:
        raise ComposeError(f"docker-compose file: {e}") from None
    if not isinstance(doc, dict):
        raise ComposeError("docker-compose file must be a mapping with services:")
    out = _interpolate_values(doc, env, _Budget())
    assert isinstance(out, dict)
    return out


def split_command(text: str) -> list[str]:
    """`text` split into words exactly as `shlex.split` does (POSIX quoting, no expansion):
    '...' is literal, inside "..." a backslash escapes only " and \\, elsewhere it escapes
    any character. ValueError for an unclosed quote or a trailing backslash. Linear time, where
    shlex is quadratic in the length of a word.
    """
    words: list[str] = []
    parts: list[str] = []
    in_word = False
    pos = 0
    while pos < len(text):
        m = _WORD_PIECE.match(text, pos)
        if m is None:
            raise ValueError("no closing quotation" if text[pos] in "'\"" else "trailing backslash")
        pos = m.end()
        space, single, double, escaped, plain = m.groups()
        if space is not None:
            if in_word:
                words.append("".join(parts))
                parts, in_word = [], False
            continue
        in_word = True
        if single is not None:
            parts.append(single)
        elif double is not None:
            parts.append(_QUOTED_ESCAPE.sub(r"\1", double))
        elif escaped is not None:
            parts.append(escaped)
        else:
            parts.append(plain)
    if in_word:
        words.append("".join(parts))
    return words


# -- policy ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComposePolicy:
    """what a compose file may ask of the container runtime in its CVM.

    `STRICT` is for the sandbox backend, where a CVM shares the host's kernel and root
    filesystem (only /run and /tmp are its own), so anything that reaches past a container's
    confinement reaches the host. It refuses, naming the service and the key:

    - `privileged: true`: every capability and device, no seccomp/AppArmor; the host kernel.
    - `cap_add` beyond docker's default set (`DOCKER_DEFAULT_CAPS`), and `ALL`: SYS_ADMIN
      mounts, SYS_MODULE loads kernel modules, SYS_PTRACE reads other processes, ...
    - `devices`, `device_cgroup_rules`: the host's disks and devices.
    - `pid`, `ipc`, `uts`, `userns_mode`, `cgroup` set to `host`: the host's namespaces.
    - `network_mode` `host`, `container:...`, `service:...`: the runner itself puts every
      container on the CVM's network; the host's is out of reach.
    - `security_opt` other than `no-new-privileges`: `seccomp=unconfined`,
      `apparmor=unconfined`, `label=disable`, `systempaths=unconfined` lift confinement, and
      profile names or paths would pick host files.
    - `sysctls`: kernel tunables.
    - bind mounts of absolute host paths (`/:/host`), except the agent sockets
      (`AGENT_SOCKETS`), and `~` paths; relative sources (`./data`) land in the app's bind
      directory on the CVM's encrypted storage.
    - keys the runner does not apply (`volumes_from`, `env_file`, `configs`, `secrets`, ...),
      so nothing is silently ignored; metadata in `_IGNORED_KEYS` is accepted and ignored.

    `PERMISSIVE` is for backends whose CVM has its own kernel: it applies all of the above and
    ignores unknown keys with a warning.
    """

    privileged: bool
    capabilities: frozenset[str] | None  # what cap_add may name; None: anything
    devices: bool
    host_namespaces: bool
    host_network: bool
    security_opts: frozenset[str] | None  # accepted security_opt entries; None: anything
    sysctls: bool
    host_binds: bool
    unknown_keys: bool


STRICT = ComposePolicy(
    privileged=False,
    capabilities=DOCKER_DEFAULT_CAPS,
    devices=False,
    host_namespaces=False,
    host_network=False,
    security_opts=frozenset({"no-new-privileges", "no-new-privileges:true"}),
    sysctls=False,
    host_binds=False,
    unknown_keys=False,
)
PERMISSIVE = ComposePolicy(
    privileged=True,
    capabilities=None,
    devices=True,
    host_namespaces=True,
    host_network=True,
    security_opts=None,
    sysctls=True,
    host_binds=True,
    unknown_keys=True,
)


# -- the parsed project ----------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """one volume of a service.

    kind: `volume` (a named volume; source is its name), `bind` (source is a normalised path
    relative to the app's bind directory), `socket` (an agent socket; source is its path),
    `host` (an absolute host path, permissive policy only), `tmpfs` (no source).
    """

    kind: Literal["volume", "bind", "socket", "host", "tmpfs"]
    source: str
    target: str
    read_only: bool = False
    options: tuple[str, ...] = ()


@dataclass
class Service:
    name: str
    image: str
    command: list[str] | None = None
    entrypoint: list[str] | None = None
    environment: dict[str, str] = field(default_factory=dict)
    volumes: list[Mount] = field(default_factory=list)
    working_dir: str = ""
    user: str = ""
    restart: str = ""
    privileged: bool = False
    depends_on: list[str] = field(default_factory=list)
    ports: list[str] = field(default_factory=list)
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    device_cgroup_rules: list[str] = field(default_factory=list)
    namespaces: dict[str, str] = field(default_factory=dict)  # podman flag -> value
    security_opt: list[str] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)


def _k(key: str) -> str:
    """a key or name for an error message, cut short."""
    return key if len(key) <= 64 else key[:64] + "..."


def _show_part(whole: YamlValue, part: str) -> str:
    """`part` of the value `whole` for an error message, unless `whole` came from the env."""
    return _show(whole) if isinstance(whole, Interpolated) else yamllimits.quote(part)


#: the most characters of a non-string value an error message shows
_SHOW_MAX = 40


def _show(value: YamlValue) -> str:
    """a value for an error message: short, and never one that came from the env."""
    if isinstance(value, Interpolated):
        return "(a value from the env)"
    if isinstance(value, str):
        return yamllimits.quote(value)
    if isinstance(value, (list, dict)):
        return f"a {type(value).__name__}"
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return "a number too long to show"
    # a YAML number may be thousands of digits long (a fuzzing finding): cut it like a string
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 3] + "..."


class _Fields:
    """typed access to one service's mapping; errors name the service and the key."""

    def __init__(self, svc: str, spec: dict[str, YamlValue], policy: ComposePolicy) -> None:
        self.svc = svc
        self.spec = spec
        self.policy = policy

    def error(self, key: str, why: str) -> ComposeError:
        return ComposeError(f"service {self.svc}: {_k(key)}: {why}")

    def text(self, key: str, value: YamlValue, what: str = "a string") -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error(key, f"must be {what}, not {_show(value)}")
        out = value if isinstance(value, str) else str(value)
        if "\0" in out:
            raise self.error(key, "must not contain NUL characters")
        return out

    def string(self, key: str, default: str = "") -> str:
        value = self.spec.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, not {_show(value)}")
        return self.text(key, value)

    def flag(self, key: str) -> bool:
        return self.flag_of(self.spec, key)

    def flag_of(self, spec: dict[str, YamlValue], key: str) -> bool:
        value = spec.get(key)
        if value is None or isinstance(value, bool):
            return bool(value)
        if isinstance(value, str) and value in _TRUE | _FALSE:
            return value in _TRUE
        raise self.error(key, f"must be true or false, not {_show(value)}")

    def items(self, key: str) -> list[YamlValue]:
        value = self.spec.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(key, f"must be a list, not {_show(value)}")
        return value

    def strings(self, key: str) -> list[str]:
        return [self.text(key, v) for v in self.items(key)]

    def argv(self, key: str) -> list[str] | None:
        value = self.spec.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                words = split_command(value)
            except ValueError as e:
                raise self.error(key, f"cannot be split into words ({e})") from None
            return [self.text(key, w) for w in words]
        if isinstance(value, list):
            return [self.text(key, v, "a list of strings") for v in value]
        raise self.error(key, f"must be a string or a list of strings, not {_show(value)}")

    def environment(self) -> dict[str, str]:
        value = self.spec.get("environment")
        pairs: list[tuple[str, YamlValue, YamlValue]] = []  # name, value, what errors show
        if value is None:
            return {}
        if isinstance(value, dict):
            pairs = [(k, v, k) for k, v in value.items()]
        elif isinstance(value, list):
            for item in value:
                if not isinstance(item, str):
                    raise self.error("environment", f"items must be strings, not {_show(item)}")
                name, sep, text = item.partition("=")
                pairs.append((name, text if sep else None, item))
        else:
            raise self.error("environment", f"must be a map or a list, not {_show(value)}")
        out: dict[str, str] = {}
        for k, v, shown in pairs:
            if not k or "=" in k or "\0" in k:
                raise self.error("environment", f"invalid variable name in {_show(shown)}")
            key = "environment" if isinstance(shown, Interpolated) else f"environment.{k}"
            if v is None:
                out[k] = ""
            elif isinstance(v, bool):
                out[k] = "true" if v else "false"
            else:
                out[k] = self.text(key, v, "a string, number or boolean")
        return out

    def depends_on(self) -> list[str]:
        value = self.spec.get("depends_on")
        if value is None:
            return []
        if isinstance(value, list):
            return [self.text("depends_on", v, "a service name") for v in value]
        if not isinstance(value, dict):
            raise self.error("depends_on", f"must be a list or a map, not {_show(value)}")
        for name, cond in value.items():
            if cond is None:
                continue
            if not isinstance(cond, dict):
                raise self.error(f"depends_on.{name}", f"must be a map, not {_show(cond)}")
            for k, v in cond.items():
                if k == "condition" and v in (
                    "service_started",
                    "service_healthy",
                    "service_completed_successfully",
                ):
                    continue
                if k in ("restart", "required") and isinstance(v, bool):
                    continue
                raise self.error(f"depends_on.{name}", f"unsupported {_k(k)}: {_show(v)}")
        return list(value)

    def capabilities(self, key: str) -> list[str]:
        out = []
        for raw in self.items(key):
            m = _CAP.match(self.text(key, raw))
            if m is None:
                raise self.error(key, f"invalid capability {_show(raw)}")
            cap = m.group(1).upper()
            allowed = self.policy.capabilities
            if key == "cap_add" and allowed is not None and cap not in allowed:
                why = "is not allowed (only docker's default capabilities)"
                raise self.error(key, f"{_show_part(raw, cap)} {why}")
            out.append(cap)
        return out

    def namespaces(self) -> dict[str, str]:
        out = {}
        for key, flag in _NAMESPACE_FLAGS.items():
            value = self.string(key)
            if not value:
                continue
            if value == "host":
                if not self.policy.host_namespaces:
                    raise self.error(key, "the host's namespace is not allowed")
            elif value not in _PRIVATE_NAMESPACES.get(key, ()):
                raise self.error(key, f"{_show(value)} is not supported")
            out[flag] = value
        return out

    def refuse_unless(self, allowed: bool, key: str, why: str) -> None:
        if not allowed and self.spec.get(key) not in (None, [], {}, False):
            raise self.error(key, why)


def _volume_names(doc: dict[str, YamlValue], policy: ComposePolicy) -> set[str]:
    vols = doc.get("volumes")
    if vols is None:
        return set()
    if not isinstance(vols, dict):
        raise ComposeError("top-level volumes: must be a mapping")
    for name, spec in vols.items():
        if not _NAME.match(name):
            raise ComposeError(f"volumes: invalid volume name {_show(name)}")
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise ComposeError(f"volumes.{name}: must be a mapping")
        for k, v in spec.items():
            ok = k in ("name", "labels") or (k == "driver" and v == "local")
            if not ok and not policy.unknown_keys:
                raise ComposeError(f"volumes.{name}: {_k(k)} is not supported by the cvm's runner")
    return set(vols)


class _Volumes:
    """a service's `volumes:` list, short and long forms, under the policy."""

    def __init__(self, f: _Fields, named: set[str]) -> None:
        self.f = f
        self.named = named

    def error(self, raw: YamlValue, why: str) -> ComposeError:
        return self.f.error("volumes", f"{_show(raw)}: {why}")

    def parse(self) -> list[Mount]:
        out = []
        for raw in self.f.items("volumes"):
            if isinstance(raw, str):
                out.append(self.short(raw))
            elif isinstance(raw, dict):
                out.append(self.long(raw))
            else:
                raise self.f.error("volumes", f"entries must be strings or maps, not {_show(raw)}")
        return out

    def short(self, raw: str) -> Mount:
        text = self.f.text("volumes", raw)
        parts = text.split(":")
        if len(parts) == 1:
            raise self.error(raw, "anonymous volumes are not supported")
        if len(parts) > 3:
            raise self.error(raw, "expected source:target[:options]")
        options = parts[2].split(",") if len(parts) == 3 else []
        bad = [o for o in options if o not in _MOUNT_OPTIONS]
        if bad:
            raise self.error(raw, f"unsupported option {_show_part(raw, bad[0])}")
        ro = "ro" in options
        extra = tuple(o for o in options if o in ("private", "rprivate", "nocopy"))
        src, dst = parts[0], self.target(raw, parts[1])
        if src.startswith(("/", ".", "~")):
            return self.bind(raw, src, dst, ro, extra)
        return self.volume(raw, src, dst, ro, extra)

    def long(self, raw: dict[str, YamlValue]) -> Mount:
        known = {"type", "source", "target", "read_only", "bind", "volume", "tmpfs", "consistency"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise self.error(raw, f"unsupported key {_show(unknown[0])}")
        kind = raw.get("type")
        dst = self.target(raw, self.f.text("volumes", raw.get("target"), "a target path"))
        ro = self.f.flag_of(raw, "read_only") if "read_only" in raw else False
        src = raw.get("source")
        if kind == "tmpfs":
            if src is not None:
                raise self.error(raw, "a tmpfs has no source")
            return Mount("tmpfs", "", dst, ro, self.tmpfs_options(raw.get("tmpfs")))
        if kind not in ("bind", "volume"):
            raise self.error(raw, "type must be bind, volume or tmpfs")
        source = self.f.text("volumes", src, "a source") if src is not None else ""
        if not source:
            raise self.error(raw, "anonymous volumes are not supported")
        if ":" in source:
            raise self.error(raw, "the source must not contain ':'")
        extra: tuple[str, ...] = ()
        sub = raw.get("bind" if kind == "bind" else "volume")
        if sub is not None:
            extra = self.sub_options(raw, kind, sub)
        if kind == "bind":
            return self.bind(raw, source, dst, ro, extra, relative_ok=True)
        return self.volume(raw, source, dst, ro, extra)

    def sub_options(self, raw: YamlValue, kind: str, sub: YamlValue) -> tuple[str, ...]:
        if not isinstance(sub, dict):
            raise self.error(raw, f"{kind}: must be a map")
        out: list[str] = []
        for k, v in sub.items():
            if kind == "bind" and k == "propagation" and v in ("private", "rprivate"):
                out.append(str(v))
            elif kind == "bind" and k == "create_host_path" and isinstance(v, bool):
                pass
            elif kind == "volume" and k == "nocopy" and isinstance(v, bool):
                out += ["nocopy"] if v else []
            else:
                raise self.error(raw, f"{kind}.{_k(k)}: {_show(v)} is not supported")
        return tuple(out)

    def tmpfs_options(self, sub: YamlValue) -> tuple[str, ...]:
        if sub is None:
            return ()
        if not isinstance(sub, dict):
            raise self.f.error("volumes", "tmpfs: must be a map")
        out = []
        for k, v in sub.items():
            text = self.f.text(f"volumes.tmpfs.{k}", v)
            if k == "size" and re.fullmatch(r"[0-9]+[kmgKMG]?", text):
                out.append(f"size={text}")
            elif k == "mode" and isinstance(v, int) and 0 <= v <= 0o7777:
                out.append(f"mode={v:o}")
            else:
                raise self.f.error("volumes", f"tmpfs.{_k(k)}: {_show(v)} is not supported")
        return tuple(out)

    def target(self, raw: YamlValue, dst: str) -> str:
        if not dst.startswith("/"):
            raise self.error(raw, "the target must be an absolute path")
        if ":" in dst or "," in dst:
            raise self.error(raw, "the target must not contain ':' or ','")
        return dst

    def volume(
        self, raw: YamlValue, name: str, dst: str, ro: bool, extra: tuple[str, ...]
    ) -> Mount:
        if not _NAME.match(name):
            raise self.error(raw, "invalid volume name")
        if name not in self.named:
            raise self.error(raw, f"volume {_show_part(raw, name)} is not declared in volumes:")
        return Mount("volume", name, dst, ro, extra)

    def bind(
        self,
        raw: YamlValue,
        src: str,
        dst: str,
        ro: bool,
        extra: tuple[str, ...],
        *,
        relative_ok: bool = False,
    ) -> Mount:
        extra = tuple(o for o in extra if o != "nocopy")
        if src.startswith("~"):
            raise self.error(raw, "home-relative (~) sources are not supported")
        if src.startswith("/"):
            path = posixpath.normpath(src)
            if path in AGENT_SOCKETS:
                return Mount("socket", path, dst, ro, extra)
            if not self.f.policy.host_binds:
                raise self.error(
                    raw,
                    "bind mounts of host paths are not allowed (the cvm shares the host's "
                    "filesystem); use a relative path (./data) or a named volume; of absolute "
                    "paths only the agent sockets " + ", ".join(sorted(AGENT_SOCKETS)),
                )
            return Mount("host", path, dst, ro, extra)
        if not (src.startswith(".") or relative_ok):
            raise self.error(raw, "a bind source must be a path")
        rel = posixpath.normpath(src)
        if rel == ".." or rel.startswith("../"):
            raise self.error(raw, "a relative bind source must stay inside the app's directory")
        return Mount("bind", rel, dst, ro, extra)


_SERVICE_KEYS = frozenset(
    {
        "image", "command", "entrypoint", "environment", "volumes", "working_dir", "user",
        "restart", "privileged", "depends_on", "ports", "network_mode", "cap_add", "cap_drop",
        "devices", "device_cgroup_rules", "security_opt", "sysctls", *_NAMESPACE_FLAGS,
    }
)  # fmt: skip


def _unknown_keys(keys: list[str], policy: ComposePolicy, where: str) -> None:
    for key in keys:
        if not policy.unknown_keys:
            raise ComposeError(f"{where}{_k(key)}: not supported by the cvm's runner")
        log.warning("%s%s: not supported by the cvm's runner; ignored", where, key[:64])


def _network_mode(f: _Fields) -> None:
    mode = f.string("network_mode")
    if mode in ("", "bridge", "default") or (mode == "host" and f.policy.host_network):
        return
    if mode == "host" or mode.startswith(("container:", "service:")):
        raise f.error(
            "network_mode",
            f"{_show(f.spec['network_mode'])} is not allowed; every service runs on the "
            "cvm's network",
        )
    raise f.error("network_mode", f"{_show(f.spec['network_mode'])} is not supported")


def _security_opt(f: _Fields) -> list[str]:
    opts = f.strings("security_opt")
    allowed = f.policy.security_opts
    for raw, opt in zip(f.items("security_opt"), opts, strict=True):
        if allowed is not None and opt.replace("=", ":") not in allowed:
            raise f.error("security_opt", f"{_show(raw)} is not allowed")
    return opts


def _sysctls(f: _Fields) -> dict[str, str]:
    value = f.spec.get("sysctls")
    if value is None:
        return {}
    if isinstance(value, dict):
        return {k: f.text(f"sysctls.{k}", v) for k, v in value.items()}
    out = {}
    for item in f.strings("sysctls"):
        k, sep, v = item.partition("=")
        if not sep:
            raise f.error("sysctls", "list items must be key=value")
        out[k] = v
    return out


def _ports(f: _Fields) -> list[str]:
    # every service already listens on the cvm's network, so ports are only checked
    return [f.text("ports", p) for p in f.items("ports") if not isinstance(p, dict)]


def _service(name: str, spec: YamlValue, named: set[str], policy: ComposePolicy) -> Service:
    if not _NAME.match(name):
        raise ComposeError(f"invalid service name {_show(name)}")
    if not isinstance(spec, dict):
        raise ComposeError(f"service {name} must be a mapping")
    f = _Fields(name, spec, policy)
    ignored = _SERVICE_KEYS | _IGNORED_KEYS
    _unknown_keys(
        [k for k in spec if k not in ignored and not k.startswith("x-")],
        policy,
        f"service {name}: ",
    )
    if "build" in spec and "image" not in spec:
        raise ComposeError(
            f"service {name}: build: is not supported in the CVM; build the image on "
            "the host and reference it by image:"
        )
    image = f.string("image")
    if not image:
        raise ComposeError(f"service {name} has no image")
    if not _IMAGE.match(image):
        raise f.error("image", f"{_show(spec['image'])} is not an image reference")
    privileged = f.flag("privileged")
    if privileged and not policy.privileged:
        raise f.error("privileged", "true is not allowed (the cvm shares the host's kernel)")
    _network_mode(f)
    why = "is not allowed (the cvm shares the host's kernel and devices)"
    f.refuse_unless(policy.devices, "devices", why)
    f.refuse_unless(policy.devices, "device_cgroup_rules", why)
    f.refuse_unless(policy.sysctls, "sysctls", "is not allowed (the host's kernel tunables)")
    restart = f.string("restart")
    if restart and not _RESTART.match(restart):
        raise f.error("restart", f"{_show(spec['restart'])} is not a restart policy")
    user = spec.get("user")
    return Service(
        name=name,
        image=image,
        command=f.argv("command"),
        entrypoint=f.argv("entrypoint"),
        environment=f.environment(),
        volumes=_Volumes(f, named).parse(),
        working_dir=f.string("working_dir"),
        user="" if user is None else f.text("user", user, "a user name or id"),
        restart=restart,
        privileged=privileged,
        depends_on=f.depends_on(),
        ports=_ports(f),
        cap_add=f.capabilities("cap_add"),
        cap_drop=f.capabilities("cap_drop"),
        devices=f.strings("devices"),
        device_cgroup_rules=f.strings("device_cgroup_rules"),
        namespaces=f.namespaces(),
        security_opt=_security_opt(f),
        sysctls=_sysctls(f),
    )


@dataclass
class ComposeProject:
    name: str
    services: list[Service]

    @classmethod
    def parse(
        cls,
        text: str,
        project: str,
        env: Mapping[str, str],
        policy: ComposePolicy = STRICT,
    ) -> ComposeProject:
        """the project in `text`, services in dependency order; ComposeError if it cannot run
        under `policy` (see the module docstring for the limits)."""
        doc = load_document(text, env)
        _unknown_keys([k for k in doc if k not in _TOP_KEYS and not k.startswith("x-")], policy, "")
        services = doc.get("services")
        if not isinstance(services, dict) or not services:
            raise ComposeError("docker-compose file has no services")
        if len(services) > MAX_SERVICES:
            raise ComposeError(f"too many services (max {MAX_SERVICES})")
        named = _volume_names(doc, policy)
        out = [_service(name, spec, named, policy) for name, spec in services.items()]
        names = {s.name for s in out}
        for s in out:
            for d in s.depends_on:
                if d not in names:
                    raise ComposeError(f"service {s.name} depends on unknown service {_show(d)}")
        return cls(project, _order(out))


def _order(services: list[Service]) -> list[Service]:
    by_name = {s.name: s for s in services}
    done: list[Service] = []
    seen: set[str] = set()
    stack: set[str] = set()

    def visit(s: Service) -> None:  # at most MAX_SERVICES deep
        if s.name in seen:
            return
        if s.name in stack:
            raise ComposeError(f"dependency cycle at service {s.name}")
        stack.add(s.name)
        for d in s.depends_on:
            visit(by_name[d])
        stack.discard(s.name)
        seen.add(s.name)
        done.append(s)

    for s in services:
        visit(s)
    return done
