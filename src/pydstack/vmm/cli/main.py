"""the `dstack` entry point: global flags, the subcommands of every module, error printing."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from pydstack.crypto.envcrypt import EnvError

from ..compose import ArgError
from . import deploy, envkeys, images, update, verify, vmms, vms
from .common import DEFAULT_URL, CliError, VmmClient, config_dir, load_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dstack", description="manage CVMs on a dstack-vmm")
    p.add_argument("--url", default=None, help=f"vmm url (DSTACK_VMM_URL; {DEFAULT_URL})")
    p.add_argument("--token", default=None, help="api token (DSTACK_VMM_TOKEN)")
    p.add_argument("--auth-user", default=None, help="basic auth user (DSTACK_VMM_AUTH_USER)")
    p.add_argument(
        "--auth-password", default=None, help="basic auth password (DSTACK_VMM_AUTH_PASSWORD)"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (vms, deploy, update, images, vmms, envkeys, verify):
        module.add_parsers(sub)
    return p


def connect(args: argparse.Namespace) -> VmmClient:
    """the VMM client of the global flags, the environment and `~/.dstack-vmm/config.json`."""
    cfg = load_json(config_dir() / "config.json", {})
    token = args.token or os.environ.get("DSTACK_VMM_TOKEN") or cfg.get("auth_token", "")
    user = args.auth_user or os.environ.get("DSTACK_VMM_AUTH_USER") or cfg.get("auth_user", "")
    password = (
        args.auth_password
        or os.environ.get("DSTACK_VMM_AUTH_PASSWORD")
        or cfg.get("auth_password", "")
    )
    if bool(user) != bool(password) and not token:
        raise CliError("basic auth needs both --auth-user and --auth-password")
    return VmmClient(vmms.resolve_url(args.url), str(token), str(user), str(password))


def _die(msg: str) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        client = None if getattr(args, "local", False) else connect(args)
        args.func(client, args)
    except (CliError, ArgError, EnvError) as e:
        _die(str(e))
    except KeyboardInterrupt:
        return 130
    return 0
