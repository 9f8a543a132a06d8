"""`dstack-vmm`: manage CVMs on this host.

    dstack-vmm [-c vmm.toml] [serve]        run the management API, web UI and host API
    dstack-vmm [-c vmm.toml] check-config   validate the configuration and exit

CVMs keep running when the VMM stops; a restarted VMM finds them again.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import sys
from pathlib import Path

from pydstack import __version__
from pydstack.errors import ConfigError
from pydstack.process import stop_signal

from . import discovery
from .app import VmmApp
from .backends import CvmBackend, make_backend
from .config import VmmConfig
from .service import build_server

log = logging.getLogger("dstack-vmm")


def parse_address(address: str, port: int, base: Path) -> tuple[str, str, int]:
    """`unix:PATH`, `tcp:HOST:PORT` or a bare host with `port` -> (kind, host/path, port)."""
    if address.startswith("unix:"):
        path = Path(address[5:])
        return "unix", str(path if path.is_absolute() else base / path), 0
    if address.startswith("tcp:"):
        host, _, port_s = address[4:].rpartition(":")
        return "tcp", host.strip("[]"), int(port_s)
    return "tcp", address, port


async def serve(config: VmmConfig, backend: CvmBackend) -> None:
    app = VmmApp(config, backend)
    server = build_server(app)  # refuses a bad htpasswd file before anything starts
    await app.start()
    base = config.config_path.parent if config.config_path else Path.cwd()
    kind, host, port = parse_address(config.address, config.port, base)
    if kind == "unix":
        await server.listen_unix(host, mode=0o660)
        where = f"unix:{host}"
        announced = where
    else:
        bound = await server.listen_tcp(host, port)
        where = f"http://{host}:{bound}"
        announced = f"{host}:{bound}"
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback and not config.auth_enabled:
            log.warning(
                "listening on %s without [auth]: anyone who reaches it controls the VMs", host
            )
    log.info(
        "dstack-vmm %s: %d vm(s), run path %s, %s backend",
        __version__,
        len(app.vms),
        config.run_path,
        backend.name,
    )
    registration = discovery.register(
        announced,
        config.config_path,
        config.image_path,
        config.run_path,
        config.node_name,
        __version__,
    )
    print(f"dstack-vmm listening on {where}", flush=True)
    try:
        await stop_signal().wait()
        log.info("shutting down (CVMs keep running)")
    finally:
        discovery.unregister(registration)
        await server.close()
        await app.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dstack-vmm", description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", type=Path, help="vmm.toml")
    parser.add_argument("command", nargs="?", default="serve", choices=("serve", "check-config"))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = VmmConfig.load(args.config)
        backend = make_backend(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problems = backend.host_problems()
    if args.command == "check-config":
        for p in problems:
            print(f"warning: {p}", file=sys.stderr)
        print("configuration is valid")
        return 0
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 2
    if config.mock_attestation_seed and config.config_path is not None:
        mode = config.config_path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning(
                "%s holds the mock attestation seed and is readable by others (mode %o): "
                "anyone who reads it can forge this host's simulated quotes; chmod 600 it or "
                "use mock_attestation_seed_file",
                config.config_path,
                mode,
            )
    try:
        asyncio.run(serve(config, backend))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
