"""`dstack-verifier -c verifier.toml`: the verification service; `--verify FILE` for one request.

With `--verify FILE` (a `/verify` request body: an Attest or GetQuote response) it verifies once,
prints the response and writes it to `FILE.verification.json`; the exit status is 0 when the
evidence is valid, 1 when not, 2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from pydstack.errors import ConfigError
from pydstack.types import jsonlimits
from pydstack.types.capped import read_capped

from .config import VerifierConfig
from .service import MAX_BODY, build_verifier, make_server

log = logging.getLogger("dstack-verifier")


async def verify_file(cfg: VerifierConfig, path: Path) -> int:
    try:
        with open(path, "rb") as f:
            raw = read_capped(f, MAX_BODY)
        body = jsonlimits.loads(raw, max_bytes=MAX_BODY)
    except OSError as e:
        print(f"error: cannot read {path}: {e.strerror}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {path} is not a json request: {e}", file=sys.stderr)
        return 2
    result = await build_verifier(cfg).verify_request(body)
    text = json.dumps(result.to_json_obj(), indent=2)
    print(text)
    out = path.with_name(path.name + ".verification.json")
    out.write_text(text + "\n")
    return 0 if result.is_valid else 1


async def serve(
    cfg: VerifierConfig, config_path: Path | None = None, *, worker: bool = False
) -> int:
    """serve until SIGINT/SIGTERM. With `processes` > 1 this process binds the port, starts the
    other workers on it (restarting one that dies, after a second) and stops them when it stops;
    a `worker` serves the port it is given and nothing else."""
    from pydstack.process import stop_signal

    server, _ = make_server(cfg, build_verifier(cfg))
    shared = worker or cfg.processes > 1
    port = await server.listen_tcp(cfg.address, cfg.port, reuse_port=shared)
    stop = stop_signal()
    supervisor = None
    if not worker:
        print(
            f"dstack-verifier listening on http://{cfg.address}:{port}"
            + (f" ({cfg.processes} processes)" if shared else ""),
            flush=True,
        )
        if cfg.processes > 1:
            supervisor = asyncio.create_task(_workers(cfg, config_path, port, stop))
    try:
        await stop.wait()
    finally:
        if supervisor is not None:
            await supervisor
        await server.close()
    return 0


def _start_worker(args: list[str]) -> subprocess.Popen[bytes]:
    # no preexec_fn: forking a process that runs threads may deadlock in the child; the worker
    # ties its life to this process itself (_die_with_parent)
    return subprocess.Popen([*args, "--parent-pid", str(os.getpid())])


def _die_with_parent(parent: int) -> None:
    """a worker must not outlive its parent, even a SIGKILL-ed one (PR_SET_PDEATHSIG; a parent
    gone before that was set is caught by the pid check)."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        raise SystemExit(0)


async def _workers(
    cfg: VerifierConfig, config_path: Path | None, port: int, stop: asyncio.Event
) -> None:
    args = [sys.executable, "-m", "pydstack.verifier.main", "--worker-port", str(port)]
    if config_path is not None:
        args += ["-c", str(config_path)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs = [_start_worker(args) for _ in range(cfg.processes - 1)]
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            for i, proc in enumerate(procs):
                if proc.poll() is not None and not stop.is_set():
                    log.warning("verifier worker %d exited (%s): restarting it", i, proc.returncode)
                    procs[i] = _start_worker(args)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dstack-verifier", description="verify dstack attestations down to the os image"
    )
    parser.add_argument(
        "-c", "--config", type=Path, help="dstack-verifier.toml (default: defaults)"
    )
    parser.add_argument("--verify", type=Path, metavar="FILE", help="verify one request and exit")
    parser.add_argument("--worker-port", type=int, help=argparse.SUPPRESS)  # a worker process
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = VerifierConfig.load(args.config) if args.config else VerifierConfig()
        if args.verify is not None:
            return asyncio.run(verify_file(cfg, args.verify))
        from pydstack.process import run_server

        if args.worker_port is not None:
            if args.parent_pid is not None:
                _die_with_parent(args.parent_pid)
            cfg = dataclasses.replace(cfg, port=args.worker_port, workers=1)
            return run_server(serve(cfg, args.config, worker=True))
        return run_server(serve(cfg, args.config))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
