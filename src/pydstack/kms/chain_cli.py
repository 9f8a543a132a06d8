"""`dstack-kms-chain`: operate the DstackKms / DstackApp contracts.

    dstack-kms-chain --rpc-url URL --chain-id N --private-key-file KEY deploy
    dstack-kms-chain ... --kms ADDR create-app --compose-hash HEX [--require-tcb-uptodate]
    dstack-kms-chain ... --kms ADDR add-compose-hash --app ADDR HEX
    dstack-kms-chain ... --kms ADDR add-os-image HEX | add-kms-mr HEX | add-kms-device HEX
    dstack-kms-chain ... --kms ADDR upgrade [--app ADDR] --artifact FILE [--call 'initializeV2()']
    dstack-kms-chain ... --kms ADDR transfer-ownership [--app ADDR] NEW_OWNER
    dstack-kms-chain ... --kms ADDR show [--app ADDR]
    dstack-kms-chain ... --kms ADDR check-app boot-info.json

Every command that sends takes --dry-run: it checks and simulates, prints what would change and
sends nothing. The private key comes from --private-key-file (mode 0600 required) or
DSTACK_KMS_CHAIN_KEY. Exit status: 0 done, 1 a check-app/check-kms denial, 2 refused or failed
(one line on stderr saying why).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from pydstack.errors import DstackError

from .bootinfo import BootInfo
from .chain import Chain, KmsContract
from .chain_abi import parse_address
from .chain_ops import FLAGS, LISTS, Operator, Plan, deploy_plan, execute
from .chain_policy import app_policy, kms_policy

#: allowlist commands: name -> (list kind, add?)
LIST_COMMANDS = {
    f"{verb}-{kind}": (kind, verb == "add") for kind in LISTS for verb in ("add", "remove")
}


def _key(args: argparse.Namespace) -> str | None:
    if args.private_key_file:
        path = Path(args.private_key_file)
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SystemExit(f"error: {path} must not be readable by others (chmod 600)")
        return path.read_text().strip()
    return os.environ.get("DSTACK_KMS_CHAIN_KEY")


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _human(value: Any, indent: str = "") -> list[str]:
    if isinstance(value, dict):
        lines = []
        for k, v in value.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{indent}{k}:")
                lines.extend(_human(v, indent + "  "))
            else:
                lines.append(f"{indent}{k}: {v}")
        return lines
    if isinstance(value, list):
        lines = []
        for item in value:
            if isinstance(item, dict) and set(item) == {"what", "from", "to"}:
                before, after = _inline(item["from"]), _inline(item["to"])
                lines.append(f"{indent}- {item['what']}: {before} -> {after}")
            elif isinstance(item, dict) and set(item) == {"value", "block"}:
                lines.append(f"{indent}- {item['value']} (block {item['block']})")
            elif isinstance(item, dict):
                lines.append(f"{indent}-")
                lines.extend(_human(item, indent + "  "))
            else:
                lines.append(f"{indent}- {item}")
        return lines
    return [f"{indent}{value}"]


def _out(args: argparse.Namespace, obj: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(obj))
    else:
        print("\n".join(_human(obj)))


def _implementation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--implementation", help="an implementation already deployed")
    g.add_argument("--artifact", type=Path, help="deploy this artifact JSON (abi, bytecode)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dstack-kms-chain", description=__doc__.split("\n")[0])
    p.add_argument("--rpc-url", default=os.environ.get("ETH_RPC_URL", "http://127.0.0.1:8545"))
    p.add_argument("--chain-id", type=int, required=True, help="refuse a node on another chain")
    p.add_argument("--private-key-file")
    p.add_argument("--kms", help="DstackKms proxy address")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--dry-run", action="store_true", help="check and simulate, print the changes, send nothing"
    )
    # the output flags work after the command too (`add-os-image --dry-run HEX`)
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    flags.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd", required=True)
    add = functools.partial(sub.add_parser, parents=[flags])
    d = add("deploy", help="deploy DstackApp impl, DstackKms impl and proxy")
    d.add_argument("--owner", help="the kms owner (default: the sender)")
    c = add("create-app", help="deploy and register a DstackApp")
    c.add_argument("--owner", help="the app owner (default: the sender)")
    c.add_argument("--compose-hash", default="")
    c.add_argument("--device", default="")
    c.add_argument("--require-tcb-uptodate", action="store_true")
    c.add_argument("--no-any-device", action="store_true", help="only listed devices")
    c.add_argument("--disable-upgrades", action="store_true")
    for name, (kind, _) in LIST_COMMANDS.items():
        s = add(name)
        if LISTS[kind][0]:
            s.add_argument("--app", required=True)
        s.add_argument("value", help="32 bytes as 64 hex digits")
    for name in FLAGS:
        s = add(name)
        s.add_argument("--app", required=True)
        s.add_argument("value", choices=["true", "false"])
    add("set-gateway-app-id").add_argument("value")
    add(
        "set-kms-info", help="setKmsInfo from {k256Pubkey, caPubkey, quote, eventlog} (hex)"
    ).add_argument("file", type=Path)
    add("register-app", help="register an app contract deployed elsewhere").add_argument("app")
    _implementation_args(
        add("set-app-implementation", help="the DstackApp implementation of new apps")
    )
    u = add("upgrade", help="upgradeToAndCall on the kms proxy (or --app's)")
    u.add_argument("--app")
    _implementation_args(u)
    g = u.add_mutually_exclusive_group()
    g.add_argument("--call", help="a function without arguments to run after, like initializeV2()")
    g.add_argument("--call-data", help="raw call data (hex) to run after the upgrade")
    add("disable-upgrades", help="make the app's implementation final").add_argument(
        "--app", required=True
    )
    t = add("transfer-ownership", help="step 1 of 2: name the new owner")
    t.add_argument("--app")
    t.add_argument("new_owner")
    add("accept-ownership", help="step 2 of 2, by the new owner").add_argument("--app")
    s = add("show", help="settings and allowlists (from events, with blocks)")
    s.add_argument("--app")
    s.add_argument("--from-block", type=int, default=0, help="scan events from this block")
    ch = add("check-app", help="isAppAllowed for a BootInfo JSON file")
    ch.add_argument("boot_info")
    ck = add("check-kms", help="isKmsAllowed for a BootInfo JSON file")
    ck.add_argument("boot_info")
    return p


def _plan(args: argparse.Namespace, op: Operator) -> Plan | None:
    cmd = args.cmd
    if cmd in LIST_COMMANDS:
        kind, enabled = LIST_COMMANDS[cmd]
        return op.set_listed(kind, args.value, enabled, getattr(args, "app", None))
    if cmd in FLAGS:
        return op.set_flag(cmd, args.app, args.value == "true")
    if cmd == "create-app":
        return op.create_app(
            owner=args.owner,
            compose_hash=args.compose_hash,
            device=args.device,
            allow_any_device=not args.no_any_device,
            require_tcb_up_to_date=args.require_tcb_uptodate,
            disable_upgrades=args.disable_upgrades,
        )
    if cmd == "set-gateway-app-id":
        return op.set_gateway_app_id(args.value)
    if cmd == "set-kms-info":
        return op.set_kms_info(args.file)
    if cmd == "register-app":
        return op.register_app(args.app)
    if cmd == "set-app-implementation":
        return op.set_app_implementation(args.implementation, args.artifact)
    if cmd == "upgrade":
        return op.upgrade(
            args.app,
            implementation=args.implementation,
            artifact_path=args.artifact,
            call=args.call,
            call_data=args.call_data,
        )
    if cmd == "disable-upgrades":
        return op.disable_upgrades(args.app)
    if cmd == "transfer-ownership":
        return op.transfer_ownership(args.app, args.new_owner)
    if cmd == "accept-ownership":
        return op.accept_ownership(args.app)
    return None


def run(args: argparse.Namespace) -> int:
    chain = Chain.connect(args.rpc_url, args.chain_id, _key(args))
    if args.cmd == "deploy":
        _out(args, execute(chain, deploy_plan(chain, args.owner), dry_run=args.dry_run))
        return 0
    if not args.kms:
        raise SystemExit("error: --kms ADDRESS is required for this command")
    kms = KmsContract.at(chain, parse_address(args.kms, "--kms"))
    op = Operator(chain, kms)
    plan = _plan(args, op)
    if plan is not None:
        _out(args, execute(chain, plan, dry_run=args.dry_run))
        return 0
    if args.cmd == "show":
        info = kms_policy(chain, kms.c, args.from_block)
        if args.app:
            info["app"] = app_policy(chain, kms.c, op.app(args.app), args.from_block)
        _out(args, info)
        return 0
    boot = BootInfo.from_json_obj(json.loads(Path(args.boot_info).read_text()))
    fn = kms.is_app_allowed if args.cmd == "check-app" else kms.is_kms_allowed
    ok, reason = fn(boot)
    _out(args, {"allowed": ok, "reason": reason})
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (DstackError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
