"""a local etcd cluster for the gateway cluster's tests and dev runs (Debian ``etcd-server``).

:class:`EtcdCluster` runs `members` ``etcd`` processes on one address (loopback, or a test's own
bridge address), each with its own client and peer port and its data under `root`; the members
form one cluster (``--initial-cluster``), so any of them can be stopped and started again with
its data. ``python -m pydstack.devetcd --members 3 DIR`` runs one in the foreground and prints
the ``etcd_endpoints`` line for gateway.toml.

:meth:`EtcdCluster.start` raises :class:`EtcdStartError` (with the end of the member's log) when
etcd is not installed or a member does not answer its health check within `patience` seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pydstack.errors import DstackError


class EtcdStartError(DstackError):
    """an etcd member would not start."""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class MemberTls:
    """client-facing TLS for the members: their certificate (valid for the cluster's host),
    and the CA client certificates must chain to (``--client-cert-auth``)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class EtcdCluster:
    """`members` etcd members on `host` with data under `root`."""

    root: Path
    members: int = 3
    host: str = "127.0.0.1"
    token: str = "pydstack-dev"
    tls: MemberTls | None = None
    #: what the health check presents to members with tls: (ca, cert, key)
    health_tls: tuple[Path, Path, Path] | None = None
    nodes: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for i in range(self.members):
            self.nodes.append(
                Member(
                    f"m{i + 1}",
                    _free_port(self.host),
                    _free_port(self.host),
                    self.root / f"m{i + 1}",
                )
            )

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    @property
    def endpoints(self) -> list[str]:
        return [f"{self.scheme}://{self.host}:{m.client_port}" for m in self.nodes]

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}=http://{self.host}:{m.peer_port}" for m in self.nodes)

    def start(self, patience: float = 30.0) -> EtcdCluster:
        """start every member that is not running, then wait for each to be healthy."""
        if shutil.which("etcd") is None:
            raise EtcdStartError("etcd is not installed (Debian: etcd-server)")
        for i in range(len(self.nodes)):
            self.start_member(i, wait=False)
        for i in range(len(self.nodes)):
            self.wait_member(i, patience)
        return self

    def start_member(self, i: int, *, wait: bool = True, patience: float = 30.0) -> None:
        m = self.nodes[i]
        if m.proc is not None and m.proc.poll() is None:
            return
        client = f"{self.scheme}://{self.host}:{m.client_port}"
        peer = f"http://{self.host}:{m.peer_port}"
        m.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        args = [
            "etcd",
            "--name", m.name,
            "--data-dir", str(m.data_dir),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self._initial_cluster(),
            "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",
            "--heartbeat-interval", "100",
            "--election-timeout", "1000",
            "--log-level", "warn",
            "--logger", "zap",
        ]  # fmt: skip
        if self.tls is not None:
            args += [
                "--cert-file", str(self.tls.cert_file),
                "--key-file", str(self.tls.key_file),
                "--client-cert-auth",
                "--trusted-ca-file", str(self.tls.client_ca_file),
            ]  # fmt: skip
        with open(self.root / f"{m.name}.log", "ab") as log:
            m.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        if wait:
            self.wait_member(i, patience)

    def wait_member(self, i: int, patience: float) -> None:
        m = self.nodes[i]
        url = f"{self.scheme}://{self.host}:{m.client_port}/health"
        ctx = None
        if self.health_tls is not None:
            ca, cert, key = self.health_tls
            ctx = ssl.create_default_context(cafile=str(ca))
            ctx.load_cert_chain(str(cert), str(key))
        deadline = time.monotonic() + patience
        while True:
            if m.proc is not None and m.proc.poll() is not None:
                raise EtcdStartError(f"etcd member {m.name} exited: {self.log_tail(i)}")
            try:
                with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                    if json.loads(r.read()).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise EtcdStartError(f"etcd member {m.name} is not healthy: {self.log_tail(i)}")
            time.sleep(0.2)

    def log_tail(self, i: int) -> str:
        try:
            return (self.root / f"{self.nodes[i].name}.log").read_text(errors="replace")[-1500:]
        except OSError:
            return "(no log)"

    def stop_member(self, i: int, *, kill: bool = False) -> None:
        m = self.nodes[i]
        if m.proc is None:
            return
        if m.proc.poll() is None:
            m.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                m.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait()
        m.proc = None

    def stop(self) -> None:
        for i in range(len(self.nodes)):
            self.stop_member(i)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pydstack.devetcd", description="a local etcd cluster")
    p.add_argument("dir", type=Path, help="where the members keep their data and logs")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args(argv)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    cluster = EtcdCluster(args.dir, args.members, args.host)
    try:
        cluster.start()
    except EtcdStartError as e:
        print(f"error: {e}", file=sys.stderr)
        cluster.stop()
        return 2
    print(f"etcd_endpoints = {json.dumps(cluster.endpoints)}", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
