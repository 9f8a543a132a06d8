"""`dstack-kms-chain`: operate the DstackKms / DstackApp contracts.

    dstack-kms-chain --rpc-url URL --chain-id N --private-key-file KEY deploy
    dstack-kms-chain ... --kms ADDR create-app --compose-hash HEX [--require-tcb-uptodate]
    dstack-kms-chain ... --kms ADDR add-compose-hash --app ADDR HEX
    dstack-kms-chain ... --kms ADDR add-os-image HEX | add-kms-mr HEX | add-kms-device HEX
    dstack-kms-chain ... --kms ADDR show [--app ADDR]
    dstack-kms-chain ... --kms ADDR check-app boot-info.json

The private key comes from --private-key-file (mode 0600 required) or DSTACK_KMS_CHAIN_KEY.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from .bootinfo import BootInfo
from .chain import Chain, ChainError, KmsContract, bytes32

KMS_SETTERS = {
    "add-os-image": "addOsImageHash",
    "remove-os-image": "removeOsImageHash",
    "add-kms-mr": "addKmsAggregatedMr",
    "remove-kms-mr": "removeKmsAggregatedMr",
    "add-kms-device": "addKmsDevice",
    "remove-kms-device": "removeKmsDevice",
}
APP_SETTERS = {
    "add-compose-hash": "addComposeHash",
    "remove-compose-hash": "removeComposeHash",
    "add-device": "addDevice",
    "remove-device": "removeDevice",
}


def _key(args: argparse.Namespace) -> str | None:
    if args.private_key_file:
        path = Path(args.private_key_file)
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SystemExit(f"error: {path} must not be readable by others (chmod 600)")
        return path.read_text().strip()
    return os.environ.get("DSTACK_KMS_CHAIN_KEY")


def _out(args: argparse.Namespace, obj: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(obj))
    else:
        for k, v in obj.items():
            print(f"{k}: {v}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dstack-kms-chain", description=__doc__.split("\n")[0])
    p.add_argument("--rpc-url", default=os.environ.get("ETH_RPC_URL", "http://127.0.0.1:8545"))
    p.add_argument("--chain-id", type=int, required=True, help="refuse a node on another chain")
    p.add_argument("--private-key-file")
    p.add_argument("--kms", help="DstackKms proxy address")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("deploy", help="deploy DstackApp impl, DstackKms impl and proxy")
    c = sub.add_parser("create-app", help="deploy and register a DstackApp")
    c.add_argument("--compose-hash", default="")
    c.add_argument("--device", default="")
    c.add_argument("--require-tcb-uptodate", action="store_true")
    c.add_argument("--no-any-device", action="store_true", help="only listed devices")
    c.add_argument("--disable-upgrades", action="store_true")
    for name in KMS_SETTERS:
        sub.add_parser(name).add_argument("value")
    for name in APP_SETTERS:
        s = sub.add_parser(name)
        s.add_argument("--app", required=True)
        s.add_argument("value")
    a = sub.add_parser("allow-any-device")
    a.add_argument("--app", required=True)
    a.add_argument("value", choices=["true", "false"])
    t = sub.add_parser("require-tcb-uptodate")
    t.add_argument("--app", required=True)
    t.add_argument("value", choices=["true", "false"])
    g = sub.add_parser("set-gateway-app-id")
    g.add_argument("value")
    s = sub.add_parser("show")
    s.add_argument("--app")
    ch = sub.add_parser("check-app", help="isAppAllowed for a BootInfo JSON file")
    ch.add_argument("boot_info")
    ck = sub.add_parser("check-kms", help="isKmsAllowed for a BootInfo JSON file")
    ck.add_argument("boot_info")
    return p


def run(args: argparse.Namespace) -> int:
    chain = Chain.connect(args.rpc_url, args.chain_id, _key(args))
    if args.cmd == "deploy":
        _out(args, {"kms": chain.deploy_kms()})
        return 0
    if not args.kms:
        raise SystemExit("error: --kms ADDRESS is required for this command")
    kms = KmsContract(chain, args.kms)
    if args.cmd == "create-app":
        app = kms.deploy_and_register_app(
            disable_upgrades=args.disable_upgrades,
            require_tcb_up_to_date=args.require_tcb_uptodate,
            allow_any_device=not args.no_any_device,
            device_id=args.device,
            compose_hash=args.compose_hash,
        )
        _out(args, {"app_id": app})
    elif args.cmd in KMS_SETTERS:
        kms.call(KMS_SETTERS[args.cmd], bytes32(args.value))
        _out(args, {"ok": True})
    elif args.cmd in APP_SETTERS:
        kms.app_call(args.app, APP_SETTERS[args.cmd], bytes32(args.value))
        _out(args, {"ok": True})
    elif args.cmd == "allow-any-device":
        kms.app_call(args.app, "setAllowAnyDevice", args.value == "true")
        _out(args, {"ok": True})
    elif args.cmd == "require-tcb-uptodate":
        kms.app_call(args.app, "setRequireTcbUpToDate", args.value == "true")
        _out(args, {"ok": True})
    elif args.cmd == "set-gateway-app-id":
        kms.call("setGatewayAppId", args.value)
        _out(args, {"ok": True})
    elif args.cmd == "show":
        f = kms.c.functions
        info: dict[str, Any] = {
            "kms": kms.address,
            "owner": f.owner().call(),
            "gateway_app_id": f.gatewayAppId().call(),
            "app_implementation": f.appImplementation().call(),
        }
        if args.app:
            a = kms.app(args.app).functions
            info.update(
                app=args.app,
                app_owner=a.owner().call(),
                registered=f.registeredApps(args.app).call(),
                allow_any_device=a.allowAnyDevice().call(),
                require_tcb_up_to_date=a.requireTcbUpToDate().call(),
            )
        _out(args, info)
    elif args.cmd in ("check-app", "check-kms"):
        boot = BootInfo.from_json_obj(json.loads(Path(args.boot_info).read_text()))
        fn = kms.is_app_allowed if args.cmd == "check-app" else kms.is_kms_allowed
        ok, reason = fn(boot)
        _out(args, {"allowed": ok, "reason": reason})
        return 0 if ok else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ChainError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
