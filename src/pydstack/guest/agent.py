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

An address is `unix:PATH` or `HOST:PORT`; an empty address disables that listener. Each listener
section also takes (extensions):

    socket_mode = "0660"        # a unix socket's permissions (octal)
    socket_group = "dstack"     # and its group (name or gid); default: the agent's
    allowed_hosts = []          # DNS names besides localhost and this machine's (`*.suffix`,
                                # `*`); behind the gateway: ["*.<gateway base domain>"]
    allowed_origins = []        # web origins (scheme://host[:port]) that may call it

and `[server_limits]` (for all listeners) `max_connections`, `tls_handshake_timeout`,
`header_timeout`, `body_timeout`, `idle_timeout` (upstream's `[default] keep_alive` is the idle
timeout when `idle_timeout` is not set).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydstack.process import run_server, stop_signal
from pydstack.rpc.limits import ServerLimits
from pydstack.tee.real import RealTdx, tdx_available
from pydstack.types.sysconfig import SysConfig

from .appkeys import AppKeys
from .core import GuestCore, QuotePlatform
from .servers import Listener, ListenerOptions, start_agent
from .signer import LocalCertSigner

log = logging.getLogger("dstack-guest-agent")
SHARED = "/dstack/.host-shared"


LISTENERS = ("internal", "internal-v0", "external")


@dataclass(frozen=True)
class AgentConfig:
    keys_file: Path = Path(f"{SHARED}/.appkeys.json")
    compose_file: Path = Path(f"{SHARED}/app-compose.json")
    sys_config_file: Path = Path(f"{SHARED}/.sys-config.json")
    internal: str = "unix:/var/run/dstack.sock"
    internal_v0: str = "unix:/var/run/tappd.sock"
    external: str = "0.0.0.0:8090"
    #: per listener section ("internal", "internal-v0", "external"); missing ones: defaults
    listeners: Mapping[str, ListenerOptions] = field(default_factory=dict)
    server_limits: ServerLimits = field(default_factory=ServerLimits)

    def options(self, section: str) -> ListenerOptions:
        return self.listeners.get(section, ListenerOptions())

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
        default = doc.get("default", {})
        keep_alive = doc.get("keep_alive", default.get("keep_alive"))
        limits = ServerLimits.from_table(
            table("server_limits"), where="server_limits", keep_alive=keep_alive
        )
        return cls(
            keys_file=Path(core.get("keys_file", base.keys_file)),
            compose_file=Path(core.get("compose_file", base.compose_file)),
            sys_config_file=Path(core.get("sys_config_file", base.sys_config_file)),
            internal=str(table("internal").get("address", base.internal)),
            internal_v0=str(table("internal-v0").get("address", base.internal_v0)),
            external=str(table("external").get("address", base.external)),
            listeners={s: ListenerOptions.from_table(s, table(s)) for s in LISTENERS},
            server_limits=limits,
        )


def listeners(config: AgentConfig) -> list[Listener]:
    """the configured listeners (an empty address disables one)."""
    out = []
    for section, address, api in (
        ("internal", config.internal, "dstack"),
        ("internal-v0", config.internal_v0, "tappd"),
        ("external", config.external, "worker"),
    ):
        if address:
            out.append(Listener(address, (api,), config.options(section), section))
    return out


async def run_agent(core: GuestCore, config: AgentConfig, stop: asyncio.Event) -> None:
    """serve the configured listeners until `stop` is set; a listener that cannot be set up
    (OSError, ValueError) closes the others and raises."""
    servers = await start_agent(core, listeners(config), limits=config.server_limits)
    try:
        await stop.wait()
    finally:
        await servers.close()


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

    try:
        run_server(run())
    except (OSError, ValueError) as e:  # a listener could not be set up
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
