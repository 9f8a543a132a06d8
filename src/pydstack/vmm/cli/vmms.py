"""`dstack vmm ls | switch` and how the CLI finds its VMM (`--url`, environment, config,
the instances running VMMs announce in `$XDG_RUNTIME_DIR/dstack-vmm/`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pwd
from pathlib import Path

from .. import discovery
from .common import DEFAULT_URL, CliError, VmmClient, config_dir, load_json
from .output import table


def resolve_url(arg: str | None) -> str:
    """--url, DSTACK_VMM_URL, config `url`, the discovered instance `vmm switch` chose, the only
    discovered instance, then the default."""
    if arg:
        return arg
    if os.environ.get("DSTACK_VMM_URL"):
        return os.environ["DSTACK_VMM_URL"]
    cfg = load_json(config_dir() / "config.json", {})
    if cfg.get("url"):
        return str(cfg["url"])
    found = discovery.instances()
    active = str(cfg.get("active_vmm") or "")
    chosen = [i for i in found if active and i.id.startswith(active)]
    if chosen:
        return chosen[0].url
    if len(found) == 1:
        return found[0].url
    return DEFAULT_URL


def cmd_vmm(c: VmmClient | None, a: argparse.Namespace) -> None:
    found = discovery.instances()
    cfg_path = config_dir() / "config.json"
    cfg = load_json(cfg_path, {})
    active = str(cfg.get("active_vmm") or "")
    if a.vmm_command == "ls":
        if a.json:
            print(json.dumps([dataclasses.asdict(i) for i in found], indent=2))
            return
        if not found:
            print("no running dstack-vmm instances found")
            return
        rows = []
        for i in found:
            mark = "*" if active and i.id.startswith(active) else ""
            try:
                user = pwd.getpwuid(Path(f"/proc/{i.pid}").stat().st_uid).pw_name
            except (OSError, KeyError):
                user = "?"
            rows.append([mark, i.id[:8], str(i.pid), user, i.node_name, i.url, i.working_dir])
        print(table(["", "ID", "PID", "USER", "NAME", "ADDRESS", "WORKING DIR"], rows))
        return
    matches = [i for i in found if i.id.startswith(a.vmm_id)]
    if len(matches) != 1:
        what = "no" if not matches else "more than one"
        raise CliError(f"{what} running dstack-vmm matches {a.vmm_id!r} (see `dstack vmm ls`)")
    cfg["active_vmm"] = matches[0].id
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"active vmm: {matches[0].id[:8]} ({matches[0].url})")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("vmm", help="running dstack-vmm instances on this host")
    vs = s.add_subparsers(dest="vmm_command", required=True)
    v = vs.add_parser("ls", help="list them")
    v.add_argument("--json", action="store_true")
    v = vs.add_parser("switch", help="make one the default for this user")
    v.add_argument("vmm_id", help="an id prefix from `dstack vmm ls`")
    s.set_defaults(func=cmd_vmm, local=True)
