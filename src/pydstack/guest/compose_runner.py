"""run an app's docker-compose project (parsed by `compose_parse`) with podman, inside the CVM.

The CVM is one network host: every service runs with the CVM's network, and each service name
resolves to 127.0.0.1 so services still reach each other by name. Named volumes and relative
bind mounts become directories on the CVM's encrypted persistent storage, so they survive stop
and start; the agent sockets are the only host paths a container may see (as the policy in
`compose_parse` allows). Images are pulled (`--pull=missing`) from the registries in the CVM's
own registries.conf (the VMM's `docker_registry` as a docker.io mirror); an image that cannot
be pulled is a clear error before any container starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import posixpath
import resource
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydstack.types import yamllimits
from pydstack.types.docker_compose import ComposeError, ComposeProject, Mount, Service
from pydstack.types.yamllimits import YamlError

log = logging.getLogger(__name__)


def host_ulimits() -> list[str]:
    """ulimits at or below the host's hard limits (runc refuses to raise them)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nofile = 65536 if nofile == resource.RLIM_INFINITY else min(nofile, 65536)
    nproc = 32768 if nproc == resource.RLIM_INFINITY else min(nproc // 2, 32768)
    return [f"--ulimit=nofile={nofile}:{nofile}", f"--ulimit=nproc={nproc}:{nproc}"]


async def run_podman(podman: str, env: Mapping[str, str], *args: str) -> tuple[int, str]:
    """podman with `args`: its status and output (stdout and stderr); a cancelled call kills
    podman instead of leaving it running."""
    proc = await asyncio.create_subprocess_exec(
        podman, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
    )
    try:
        out, _ = await proc.communicate()
    except asyncio.CancelledError:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")


def podman_env(
    storage_conf: Path, registries_conf: Path | None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """the environment of every podman call of a CVM: its own storage and registries."""
    env = {**os.environ, "CONTAINERS_STORAGE_CONF": str(storage_conf), **(extra or {})}
    if registries_conf is not None:
        env["CONTAINERS_REGISTRIES_CONF"] = str(registries_conf)
    return env


#: at most this many images are pulled ahead, each name at most this long
MAX_PREFETCH, MAX_IMAGE_NAME = 16, 512


def named_images(compose_yaml: str) -> list[str]:
    """the images a docker-compose file names outright, in order, each once: not those named
    through `$` (the app's encrypted env decides them, known only after its keys), nor any
    name podman could read as a flag. [] for a file that does not parse (the boot reports it)."""
    try:
        doc = yamllimits.load(compose_yaml)
    except YamlError:
        return []
    services = doc.get("services") if isinstance(doc, dict) else None
    if not isinstance(services, dict):
        return []
    out: dict[str, None] = {}
    for svc in services.values():
        image = svc.get("image") if isinstance(svc, dict) else None
        if (
            isinstance(image, str)
            and 0 < len(image) <= MAX_IMAGE_NAME
            and "$" not in image
            and not image.startswith("-")
            and image.isprintable()
        ):
            out[image] = None
    return list(out)[:MAX_PREFETCH]


class ImagePrefetch:
    """pulls a new storage's images while the boot does other work (its keys, its disk): the
    images of a measured compose file, before the app's keys exist. Nothing of an image runs
    until the containers start, after the keys, as without it; a pull that fails here is
    tried again then, and its error reported there."""

    def __init__(self, images: list[str], env: Mapping[str, str], podman: str = "podman") -> None:
        self.images = images
        self._task = asyncio.create_task(self._pull(dict(env), podman))

    async def _pull(self, env: dict[str, str], podman: str) -> set[str]:
        pulled = set()
        for image in self.images:
            started = time.monotonic()
            code, out = await run_podman(podman, env, "pull", "--quiet", "--", image)
            if code == 0:
                pulled.add(image)
                log.info("pulled image %s ahead in %.1f s", image, time.monotonic() - started)
            else:
                log.info("pulling image %s ahead failed: %s", image, out.strip()[-200:])
        return pulled

    async def pulled(self) -> set[str]:
        """the images that were pulled (waits for the pulls); none after `cancel`."""
        if self._task.cancelled():
            return set()
        try:
            return await asyncio.shield(self._task)
        except Exception:
            log.exception("pulling images ahead failed")
            return set()

    async def cancel(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


class PodmanCompose:
    """`up`/`down`/`ps` of one project with podman, storage confined to the CVM."""

    def __init__(
        self,
        project: ComposeProject,
        *,
        storage_conf: Path,
        volumes_dir: Path,
        binds_dir: Path,
        agent_sockets: Mapping[str, Path] | None = None,
        logs_dir: Path | None = None,
        cgroup_parent: str | None = None,
        podman: str = "podman",
        env: Mapping[str, str] | None = None,
        userns: tuple[int, int] | None = None,
        registries_conf: Path | None = None,
        new_storage: bool = False,
        prefetch: ImagePrefetch | None = None,
    ) -> None:
        """`binds_dir` holds the app's relative bind mounts (`./data`), created on first use
        with mode 0700; `agent_sockets` maps an agent socket path a compose file may mount
        (`/var/run/dstack.sock`, ...) to the socket on this side (default: the same path).
        `new_storage`: the storage was created empty for this boot, so `up` neither asks which
        images are there nor removes an earlier boot's containers (two podman calls, about a
        second each under TCG). `prefetch`: pulls of this storage's images already under way;
        `up` waits for them and pulls only what they did not."""
        self.project = project
        self.new_storage = new_storage
        self.prefetch = prefetch
        #: (first host id, count): container root is that unprivileged host uid, not host root
        self.userns = userns
        self.volumes_dir = volumes_dir
        self.binds_dir = binds_dir
        self.agent_sockets = dict(agent_sockets or {})
        self.logs_dir = logs_dir or volumes_dir.parent / "container-logs"
        self.cgroup_parent = cgroup_parent
        self.podman = podman
        self.env = podman_env(storage_conf, registries_conf, env)
        self._log_tasks: list[asyncio.Task[None]] = []

    def container(self, svc: Service) -> str:
        return f"{self.project.name}-{svc.name}-1"

    async def _podman(self, *args: str, check: bool = True) -> tuple[int, str]:
        code, text = await run_podman(self.podman, self.env, *args)
        if check and code != 0:
            raise ComposeError(f"podman {args[0]} failed: {text.strip()[-2000:]}")
        return code, text

    def run_args(self, svc: Service) -> list[str]:
        """`podman run` arguments for `svc`; every value rides in its flag (`--flag=value`),
        so no value can be read as another flag, and the image is the first bare argument."""
        args = ["run", "-d", "--pull=missing", f"--name={self.container(svc)}", "--network=host"]
        args += [f"--label=com.docker.compose.project={self.project.name}"]
        args += [f"--label=com.docker.compose.service={svc.name}"]
        args += [f"--add-host={other.name}:127.0.0.1" for other in self.project.services]
        args += host_ulimits()
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        args += ["--log-driver=k8s-file", f"--log-opt=path={self.log_path(svc)}"]
        args += ["--log-opt=max-size=10mb"]
        if self.cgroup_parent:  # the app counts against the cvm's vcpu and memory
            args += [f"--cgroup-parent={self.cgroup_parent}"]
        if self.userns is not None:  # container root is an unprivileged host uid
            base, size = self.userns
            args += [f"--uidmap=0:{base}:{size}", f"--gidmap=0:{base}:{size}"]
        args += [f"--env={k}={v}" for k, v in svc.environment.items()]
        args += [self.mount_arg(m) for m in svc.volumes]
        args += self.privilege_args(svc)
        if svc.working_dir:
            args += [f"--workdir={svc.working_dir}"]
        if svc.user:
            args += [f"--user={svc.user}"]
        if svc.restart and svc.restart != "no":
            args += [f"--restart={svc.restart}"]
        if svc.entrypoint is not None:
            args += [f"--entrypoint={json.dumps(svc.entrypoint)}"]
        args.append(svc.image)
        args += svc.command or []
        return args

    def privilege_args(self, svc: Service) -> list[str]:
        """what the service asks of the kernel; the parser's policy already vetted it."""
        args = ["--privileged"] if svc.privileged else []
        args += [f"--cap-add={c}" for c in svc.cap_add]
        args += [f"--cap-drop={c}" for c in svc.cap_drop]
        args += [f"--device={d}" for d in svc.devices]
        args += [f"--device-cgroup-rule={r}" for r in svc.device_cgroup_rules]
        args += [f"--{flag}={value}" for flag, value in svc.namespaces.items()]
        args += [f"--security-opt={o}" for o in svc.security_opt]
        args += [f"--sysctl={k}={v}" for k, v in svc.sysctls.items()]
        return args

    def mount_arg(self, m: Mount) -> str:
        opts = ",".join((("ro",) if m.read_only else ()) + m.options)
        if m.kind == "tmpfs":
            return f"--tmpfs={m.target}" + (f":{opts}" if opts else "")
        if m.kind == "volume":
            path = self.volumes_dir / f"{self.project.name}_{m.source}"
            if not path.exists():
                path.mkdir(parents=True)
                self._app_owned(path)
            src = str(path)
        elif m.kind == "bind":
            src = str(self.bind_source(m.source))
        elif m.kind == "socket":
            src = str(self.agent_sockets.get(m.source, Path(m.source)))
        else:  # "host": only a permissive policy lets these through
            src = m.source
        return f"--volume={src}:{m.target}" + (f":{opts}" if opts else "")

    def _app_owned(self, path: Path) -> None:
        """a directory the runner made for the app: owned by container root when the app runs
        in a user namespace (else it could not write its own volume)."""
        if self.userns is not None:
            os.chown(path, self.userns[0], self.userns[0])

    def bind_source(self, rel: str) -> Path:
        """the directory of a relative bind under `binds_dir`, made (0700) if missing.

        Refuses (ComposeError) a path leaving `binds_dir` and any symlink on the way: another
        container may have planted one in a directory it shares. Existing files are bound as
        they are. A container that swaps a checked directory for a symlink between this check
        and podman's mount is not caught here.
        """
        norm = posixpath.normpath(rel)
        if norm.startswith("/") or norm == ".." or norm.startswith("../"):
            raise ComposeError(f"bind source {rel[:100]!r} leaves the app's bind directory")
        self.binds_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.binds_dir
        for part in [] if norm == "." else norm.split("/"):
            path = path / part
            try:
                st = path.lstat()
            except FileNotFoundError:
                st = None
            except OSError as e:  # e.g. a file where a directory should be
                raise ComposeError(f"bind source {rel[:100]!r}: {e.strerror}") from None
            if st is None:
                try:
                    path.mkdir(mode=0o700)
                except OSError as e:
                    raise ComposeError(f"bind source {rel[:100]!r}: {e.strerror}") from None
                self._app_owned(path)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise ComposeError(f"bind source {rel[:100]!r} goes through a symlink")
        real, base = os.path.realpath(path), os.path.realpath(self.binds_dir)
        if real != base and not real.startswith(base + os.sep):
            raise ComposeError(f"bind source {rel[:100]!r} leaves the app's bind directory")
        return path

    async def pull_images(self) -> None:
        """pull every service's image that is not here yet, each once; ComposeError naming the
        first one that cannot be pulled."""
        ahead: set[str] = set()
        if self.prefetch is not None:
            ahead = await self.prefetch.pulled()
            self.prefetch = None
        for image in dict.fromkeys(svc.image for svc in self.project.services):
            if image in ahead:
                continue
            if not self.new_storage:
                code, _ = await self._podman("image", "exists", "--", image, check=False)
                if code == 0:
                    continue
            log.info("pulling image %s", image)
            started = time.monotonic()
            code, out = await self._podman("pull", "--quiet", "--", image, check=False)
            if code != 0:
                users = ", ".join(s.name for s in self.project.services if s.image == image)
                raise ComposeError(
                    f"image {image} of service {users} cannot be pulled: {out.strip()[-500:]}"
                )
            log.info("pulled image %s in %.1f s", image, time.monotonic() - started)

    async def up(self, log_sink: asyncio.StreamWriter | None = None) -> None:
        await self.pull_images()
        # containers of an earlier boot of this CVM are not running (their processes went with
        # it): removing them is one podman call, where down() stops gracefully first
        if not self.new_storage:
            names = [self.container(s) for s in self.project.services]
            await self._podman("rm", "--ignore", "-f", *names, check=False)
        self.new_storage = False  # a later up() in this boot finds this one's containers
        for svc in self.project.services:
            log.info("starting service %s (%s)", svc.name, svc.image)
            t = time.monotonic()
            await self._podman(*self.run_args(svc))
            log.info("started service %s in %.1f s", svc.name, time.monotonic() - t)
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
