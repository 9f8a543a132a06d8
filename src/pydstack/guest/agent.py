"""`dstack-guest-agent -c agent.toml`: the guest agent of a CVM on real TDX.

Configuration (TOML; upstream's key names; `[default.*]` tables are read as well):

    [core]
    keys_file = "/dstack/.host-shared/.appkeys.json"
    compose_file = "/dstack/.host-shared/app-compose.json"
    sys_config_file = "/dstack/.host-shared/.sys-config.json"

    [internal]          # DstackGuest
    address = "unix:/var/run/dstack.sock"
    [internal-v0]       # legacy Tappd
    address = "unix:/var/run/tappd.sock"
    [external]          # Worker, dashboard, /metrics, /logs
    address = "0.0.0.0:8090"

An address is `unix:PATH` or `HOST:PORT`; an empty address disables that listener.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydstack.rpc.server import PrpcServer
from pydstack.tee.real import RealTdx, tdx_available

from .appkeys import AppKeys
from .core import GuestCore, QuotePlatform
from .http_routes import add_routes
from .service import guest_service, tappd_service, worker_service
from .signer import LocalCertSigner
from .simulator import stop_signal
from .sysconfig import SysConfig

log = logging.getLogger("dstack-guest-agent")
SHARED = "/dstack/.host-shared"


@dataclass(frozen=True)
class AgentConfig:
    keys_file: Path = Path(f"{SHARED}/.appkeys.json")
    compose_file: Path = Path(f"{SHARED}/app-compose.json")
    sys_config_file: Path = Path(f"{SHARED}/.sys-config.json")
    internal: str = "unix:/var/run/dstack.sock"
    internal_v0: str = "unix:/var/run/tappd.sock"
    external: str = "0.0.0.0:8090"

    @classmethod
    def from_toml(cls, text: str) -> AgentConfig:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"invalid agent config: {e}") from e

        def table(name: str) -> dict[str, Any]:
            merged: dict[str, Any] = {}
            for src in (doc.get("default", {}).get(name, {}), doc.get(name, {})):
                if not isinstance(src, dict):
                    raise ValueError(f"agent config [{name}] must be a table")
                merged.update(src)
            return merged

        core = table("core")
        base = cls()
        return cls(
            keys_file=Path(core.get("keys_file", base.keys_file)),
            compose_file=Path(core.get("compose_file", base.compose_file)),
            sys_config_file=Path(core.get("sys_config_file", base.sys_config_file)),
            internal=str(table("internal").get("address", base.internal)),
            internal_v0=str(table("internal-v0").get("address", base.internal_v0)),
            external=str(table("external").get("address", base.external)),
        )


async def listen(server: PrpcServer, address: str) -> str:
    if address.startswith("unix:"):
        await server.listen_unix(address[5:])
        return address
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"invalid listen address {address!r}: expected unix:PATH or HOST:PORT")
    bound = await server.listen_tcp(host.strip("[]"), int(port))
    return f"{host}:{bound}"


async def run_agent(core: GuestCore, config: AgentConfig, stop: asyncio.Event) -> None:
    servers: list[PrpcServer] = []
    headers = {"X-App-Version": "pydstack"}
    for address, mount in (
        (config.internal, guest_service),
        (config.internal_v0, tappd_service),
        (config.external, worker_service),
    ):
        if not address:
            continue
        server = PrpcServer(response_headers=headers)
        server.mount(mount(core))
        if mount is worker_service:
            add_routes(server.app, core)
        log.info(
            "serving %s on %s",
            mount.__name__.removesuffix("_service"),
            await listen(server, address),
        )
        servers.append(server)
    try:
        await stop.wait()
    finally:
        for s in servers:
            await s.close()


def build_core(config: AgentConfig, platform: QuotePlatform) -> GuestCore:
    keys = AppKeys.load(config.keys_file)
    compose = config.compose_file.read_bytes()
    sys_config = SysConfig.load(config.sys_config_file)
    return GuestCore(platform, keys, compose, sys_config, LocalCertSigner(keys))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dstack-guest-agent", description="the dstack guest agent"
    )
    parser.add_argument("-c", "--config", type=Path, help="agent config (TOML)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = AgentConfig.from_toml(args.config.read_text()) if args.config else AgentConfig()
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not tdx_available():
        print(
            "error: no tdx guest interface (configfs-tsm or /dev/tdx_guest); "
            "use dstack-simulator for development",
            file=sys.stderr,
        )
        return 1
    try:
        core = build_core(config, RealTdx())
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    async def run() -> None:
        await run_agent(core, config, stop_signal())

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
