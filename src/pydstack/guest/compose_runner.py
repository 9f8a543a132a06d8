"""run an app's docker-compose file with podman, inside the CVM.

The CVM is one network host: every service runs with the CVM's network (as if
`network_mode: host`), and each service name resolves to 127.0.0.1 so services still reach each
other by name. Named volumes become directories on the CVM's encrypted persistent storage, so
they survive stop and start. `${VAR}`, `${VAR:-default}`, `${VAR-default}` and `$$` are
interpolated from the app's decrypted env (nothing from the host leaks in). Images come from
the host's image store (read-only) or earlier builds; there is no registry, so a missing image is
a clear error rather than a pull.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import resource
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)
MAX_COMPOSE = 4 * 1024 * 1024
MAX_SERVICES = 64
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
_VAR = re.compile(
    r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)


class ComposeError(ValueError):
    """the docker-compose file cannot be run."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        value = env.get(name)
        if op in (":-", "-"):
            if value is None or (op == ":-" and value == ""):
                return arg
        elif op in (":?", "?") and (value is None or (op == ":?" and value == "")):
            raise ComposeError(f"required variable {name} is missing: {arg}")
        return value or ""

    return _VAR.sub(sub, text)


@dataclass
class Service:
    name: str
    image: str
    command: list[str] | None = None
    entrypoint: list[str] | None = None
    environment: dict[str, str] = field(default_factory=dict)
    volumes: list[tuple[str, str, str, bool]] = field(default_factory=list)  # kind, src, dst, ro
    working_dir: str = ""
    user: str = ""
    restart: str = ""
    privileged: bool = False
    depends_on: list[str] = field(default_factory=list)
    ports: list[str] = field(default_factory=list)


def _cmd(value: object, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        import shlex

        return shlex.split(value)
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    raise ComposeError(f"{what} must be a string or a list of strings")


def _env(value: object, svc: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if value is None:
        return out
    if isinstance(value, dict):
        for k, v in value.items():
            out[str(k)] = "" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    elif isinstance(value, list):
        for item in value:
            k, sep, v = str(item).partition("=")
            out[k] = v if sep else ""
    else:
        raise ComposeError(f"service {svc}: environment must be a map or a list")
    return out


def _volumes(value: object, svc: str, named: set[str]) -> list[tuple[str, str, str, bool]]:
    out: list[tuple[str, str, str, bool]] = []
    for item in value or []:  # type: ignore[attr-defined]
        if isinstance(item, str):
            parts = item.split(":")
            if len(parts) == 1:
                raise ComposeError(f"service {svc}: anonymous volume {item!r} is not supported")
            src, dst = parts[0], parts[1]
            ro = len(parts) > 2 and "ro" in parts[2].split(",")
        elif isinstance(item, dict):
            src, dst = str(item.get("source", "")), str(item.get("target", ""))
            ro = bool(item.get("read_only", False))
        else:
            raise ComposeError(f"service {svc}: invalid volume {item!r}")
        if not dst.startswith("/"):
            raise ComposeError(f"service {svc}: volume target {dst!r} must be absolute")
        if src.startswith(("/", ".", "~")):
            out.append(("bind", src, dst, ro))
        else:
            if not _NAME.match(src):
                raise ComposeError(f"service {svc}: invalid volume name {src!r}")
            if src not in named:
                raise ComposeError(f"service {svc}: volume {src!r} is not declared in volumes:")
            out.append(("volume", src, dst, ro))
    return out


@dataclass
class ComposeProject:
    name: str
    services: list[Service]

    @classmethod
    def parse(cls, text: str, project: str, env: Mapping[str, str]) -> ComposeProject:
        if len(text.encode()) > MAX_COMPOSE:
            raise ComposeError(f"docker-compose file exceeds {MAX_COMPOSE} bytes")
        try:
            doc = yaml.safe_load(interpolate(text, env))
        except yaml.YAMLError as e:
            raise ComposeError(f"docker-compose file is not valid yaml: {e}") from e
        if not isinstance(doc, dict):
            raise ComposeError("docker-compose file must be a mapping with services:")
        services = doc.get("services")
        if not isinstance(services, dict) or not services:
            raise ComposeError("docker-compose file has no services")
        if len(services) > MAX_SERVICES:
            raise ComposeError(f"too many services (max {MAX_SERVICES})")
        vols = doc.get("volumes") or {}
        if not isinstance(vols, dict):
            raise ComposeError("top-level volumes: must be a mapping")
        named = {str(k) for k in vols}
        out: list[Service] = []
        for name, spec in services.items():
            name = str(name)
            if not _NAME.match(name):
                raise ComposeError(f"invalid service name {name!r}")
            if not isinstance(spec, dict):
                raise ComposeError(f"service {name} must be a mapping")
            if "build" in spec and "image" not in spec:
                raise ComposeError(
                    f"service {name}: build: is not supported in the CVM; build the image on "
                    "the host and reference it by image:"
                )
            image = spec.get("image")
            if not isinstance(image, str) or not image:
                raise ComposeError(f"service {name} has no image")
            mode = spec.get("network_mode", "host")
            if mode not in ("host", "bridge", None):
                raise ComposeError(f"service {name}: network_mode {mode!r} is not supported")
            deps = spec.get("depends_on") or []
            out.append(
                Service(
                    name=name,
                    image=image,
                    command=_cmd(spec.get("command"), f"service {name}: command"),
                    entrypoint=_cmd(spec.get("entrypoint"), f"service {name}: entrypoint"),
                    environment=_env(spec.get("environment"), name),
                    volumes=_volumes(spec.get("volumes"), name, named),
                    working_dir=str(spec.get("working_dir") or ""),
                    user=str(spec.get("user") or ""),
                    restart=str(spec.get("restart") or ""),
                    privileged=bool(spec.get("privileged", False)),
                    depends_on=[str(d) for d in deps],
                    ports=[str(p) for p in spec.get("ports") or []],
                )
            )
        names = {s.name for s in out}
        for s in out:
            for d in s.depends_on:
                if d not in names:
                    raise ComposeError(f"service {s.name} depends on unknown service {d}")
        return cls(project, _order(out))


def _order(services: list[Service]) -> list[Service]:
    by_name = {s.name: s for s in services}
    done: list[Service] = []
    seen: set[str] = set()
    stack: set[str] = set()

    def visit(s: Service) -> None:
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


def host_ulimits() -> list[str]:
    """ulimits at or below the host's hard limits (runc refuses to raise them)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nofile = 65536 if nofile == resource.RLIM_INFINITY else min(nofile, 65536)
    nproc = 32768 if nproc == resource.RLIM_INFINITY else min(nproc // 2, 32768)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


class PodmanCompose:
    """`up`/`down`/`ps` of one project with podman, storage confined to the CVM."""

    def __init__(
        self,
        project: ComposeProject,
        *,
        storage_conf: Path,
        volumes_dir: Path,
        logs_dir: Path | None = None,
        cgroup_parent: str | None = None,
        podman: str = "podman",
        env: Mapping[str, str] | None = None,
        userns: tuple[int, int] | None = None,
    ) -> None:
        self.project = project
        #: (first host id, count): container root is that unprivileged host uid, not host root
        self.userns = userns
        self.volumes_dir = volumes_dir
        self.logs_dir = logs_dir or volumes_dir.parent / "container-logs"
        self.cgroup_parent = cgroup_parent
        self.podman = podman
        self.env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(storage_conf), **(env or {})}
        self._log_tasks: list[asyncio.Task[None]] = []

    def container(self, svc: Service) -> str:
        return f"{self.project.name}-{svc.name}-1"

    async def _podman(self, *args: str, check: bool = True) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            self.podman,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
        )
        out, _ = await proc.communicate()
        text = out.decode(errors="replace")
        if check and proc.returncode != 0:
            raise ComposeError(f"podman {args[0]} failed: {text.strip()[-2000:]}")
        return proc.returncode or 0, text

    def run_args(self, svc: Service) -> list[str]:
        args = ["run", "-d", "--pull=never", "--name", self.container(svc), "--network", "host"]
        args += ["--label", f"com.docker.compose.project={self.project.name}"]
        args += ["--label", f"com.docker.compose.service={svc.name}"]
        for other in self.project.services:
            args += ["--add-host", f"{other.name}:127.0.0.1"]
        args += host_ulimits()
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        args += ["--log-driver", "k8s-file", "--log-opt", f"path={self.log_path(svc)}"]
        args += ["--log-opt", "max-size=10mb"]
        if self.cgroup_parent:  # the app counts against the cvm's vcpu and memory
            args += ["--cgroup-parent", self.cgroup_parent]
        if self.userns is not None:
            base, size = self.userns
            args += ["--uidmap", f"0:{base}:{size}", "--gidmap", f"0:{base}:{size}"]
        for k, v in svc.environment.items():
            args += ["-e", f"{k}={v}"]
        for kind, src, dst, ro in svc.volumes:
            if kind == "volume":
                path = self.volumes_dir / f"{self.project.name}_{src}"
                path.mkdir(parents=True, exist_ok=True)
                if self.userns is not None:  # writable by container root
                    os.chown(path, self.userns[0], self.userns[0])
                src = str(path)
            args += ["-v", f"{src}:{dst}{':ro' if ro else ''}"]
        if svc.working_dir:
            args += ["-w", svc.working_dir]
        if svc.user:
            args += ["--user", svc.user]
        if svc.restart and svc.restart != "no":
            args += ["--restart", svc.restart]
        if svc.privileged:
            args.append("--privileged")
        if svc.entrypoint is not None:
            args += ["--entrypoint", json.dumps(svc.entrypoint)]
        args.append(svc.image)
        args += svc.command or []
        return args

    async def check_images(self) -> None:
        for svc in self.project.services:
            code, _ = await self._podman("image", "exists", svc.image, check=False)
            if code != 0:
                raise ComposeError(
                    f"image {svc.image} of service {svc.name} is not available "
                    "(no registry: build or load it on the host with podman)"
                )

    async def up(self, log_sink: asyncio.StreamWriter | None = None) -> None:
        await self.check_images()
        await self.down()
        for svc in self.project.services:
            log.info("starting service %s (%s)", svc.name, svc.image)
            await self._podman(*self.run_args(svc))
            self._log_tasks.append(asyncio.create_task(self._follow(svc)))

    def log_path(self, svc: Service) -> Path:
        return self.logs_dir / f"{self.container(svc)}.log"

    async def _follow(self, svc: Service) -> None:
        """copy the service's output into the CVM's console as `name | line`.

        conmon writes it in k8s-file form (`<time> <stream> <P|F> <text>`, P for a partial
        line); reading that file here costs no process per service, unlike `podman logs -f`.
        """
        path = self.log_path(svc)
        offset, partial, buf = 0, "", b""
        while True:
            try:
                size = path.stat().st_size
                if size < offset:  # rotated
                    offset, buf = 0, b""
                if size > offset:
                    with open(path, "rb") as f:
                        f.seek(offset)
                        data = f.read(min(size - offset, 1 << 20))
                    offset += len(data)
                    buf += data
                    *lines, buf = buf.split(b"\n")
                    for raw in lines:
                        parts = raw.decode(errors="replace").split(" ", 3)
                        if len(parts) < 4:
                            continue
                        partial += parts[3]
                        if parts[2] != "P":
                            print(f"{svc.name} | {partial}", flush=True)
                            partial = ""
                    continue
            except FileNotFoundError:
                pass
            await asyncio.sleep(0.2)

    async def down(self, timeout: int = 10) -> None:
        names = [self.container(s) for s in self.project.services]
        await self._podman("stop", "--ignore", "-t", str(timeout), *names, check=False)
        await self._podman("rm", "--ignore", "-f", *names, check=False)
        for t in self._log_tasks:
            t.cancel()
        self._log_tasks.clear()

    async def ps(self) -> list[dict[str, Any]]:
        _, out = await self._podman(
            "ps",
            "-a",
            "--format",
            "json",
            "--filter",
            f"label=com.docker.compose.project={self.project.name}",
            check=False,
        )
        try:
            items = json.loads(out or "[]")
        except ValueError:
            return []
        return items if isinstance(items, list) else []
