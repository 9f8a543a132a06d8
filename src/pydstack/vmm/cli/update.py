"""`dstack update-env | update-app-compose | update-user-config | update-ports | update |
resize`: changing an existing VM (UpgradeApp, ResizeVm)."""

from __future__ import annotations

import argparse
import hashlib
import json
from typing import Any

from google.protobuf.empty_pb2 import Empty

from pydstack.rpc.proto import vmm_rpc_pb2 as pb

from ..compose import compose_bytes, parse_disk_gb, parse_memory_mb
from .common import CliError, VmmClient, read_text
from .deploy import gpu_config, port_mappings, swap_bytes
from .envkeys import encrypt_env_file
from .vms import get_info


def _compose_of(info: pb.VmInfo, text: str | None = None) -> dict[str, Any]:
    try:
        doc = json.loads(text or info.configuration.compose_file or "{}")
    except ValueError as e:
        raise CliError(f"the vm's app compose is not json: {e}") from e
    if not isinstance(doc, dict):
        raise CliError("the vm's app compose is not a json object")
    return doc


def env_update(
    c: VmmClient,
    req: pb.UpdateVmRequest,
    env_path: str,
    kms_urls: list[str] | None,
    assume_yes: bool,
) -> None:
    """fill `req` with the new `encrypted_env`, and with the compose whose `allowed_envs` (and
    legacy `launch_token_hash`) follow the new keys when they change (or when `req` already
    carries a compose)."""
    info = get_info(c, req.id)
    if not kms_urls:
        raise CliError("--env-file needs --kms-url to fetch the env public key from")
    encrypted, pairs = encrypt_env_file(env_path, kms_urls[0], info.app_id, assume_yes)
    keys = [k for k, _ in pairs]
    compose = _compose_of(info, req.compose_file or None)
    changed = False
    if compose.get("allowed_envs") != keys:
        compose["allowed_envs"] = keys
        changed = True
    envs = dict(pairs)
    if "APP_LAUNCH_TOKEN" in envs:
        token_hash = hashlib.sha256(envs["APP_LAUNCH_TOKEN"].encode()).hexdigest()
        if compose.get("launch_token_hash") != token_hash:
            compose["launch_token_hash"] = token_hash
            changed = True
    req.encrypted_env = encrypted
    if changed or req.compose_file:
        req.compose_file = compose_bytes(compose).decode()


def cmd_update_env(c: VmmClient, a: argparse.Namespace) -> None:
    req = pb.UpdateVmRequest(id=a.vm_id)
    env_update(c, req, a.env_file, a.kms_url, a.yes)
    c.call("UpgradeApp", req, pb.Id)
    print(f"updated env of vm {a.vm_id}")


def cmd_update_app_compose(c: VmmClient, a: argparse.Namespace) -> None:
    req = pb.UpdateVmRequest(id=a.vm_id, compose_file=read_text(a.compose_path))
    c.call("UpgradeApp", req, pb.Id)
    print(f"updated app compose of vm {a.vm_id}")


def cmd_update_user_config(c: VmmClient, a: argparse.Namespace) -> None:
    c.call("UpgradeApp", pb.UpdateVmRequest(id=a.vm_id, user_config=read_text(a.path)), pb.Id)
    print(f"updated user config of vm {a.vm_id}")


def cmd_update_ports(c: VmmClient, a: argparse.Namespace) -> None:
    req = pb.UpdateVmRequest(id=a.vm_id, update_ports=True, ports=port_mappings(a.port))
    c.call("UpgradeApp", req, pb.Id)
    print(f"updated port mappings of vm {a.vm_id}")


def resize_request(a: argparse.Namespace) -> pb.ResizeVmRequest | None:
    """the ResizeVm message of the resource flags, None when none is given."""
    req = pb.ResizeVmRequest(id=a.vm_id)
    if a.vcpu is not None:
        req.vcpu = a.vcpu
    if a.memory is not None:
        req.memory = parse_memory_mb(a.memory)
    if a.disk is not None:
        req.disk_size = parse_disk_gb(a.disk)
    if a.image is not None:
        req.image = a.image
    return req if _sets_more_than_id(req) else None


def _sets_more_than_id(req: pb.ResizeVmRequest | pb.UpdateVmRequest) -> bool:
    return any(f.name != "id" for f, _ in req.ListFields())


def cmd_resize(c: VmmClient, a: argparse.Namespace) -> None:
    req = resize_request(a)
    if req is None:
        raise CliError("nothing to resize: give --vcpu, --memory, --disk or --image")
    c.call("ResizeVm", req, Empty)
    print(f"resized vm {a.vm_id}")


def update_request(c: VmmClient, a: argparse.Namespace) -> pb.UpdateVmRequest | None:
    """the UpgradeApp message of `update`'s non-resource flags, None when none is given."""
    req = pb.UpdateVmRequest(id=a.vm_id)
    if a.compose or a.prelaunch_script is not None or a.swap is not None:
        compose = _compose_of(get_info(c, a.vm_id))
        if a.compose:  # as upstream: a docker-compose file replacing docker_compose_file
            compose["docker_compose_file"] = read_text(a.compose)
        if a.prelaunch_script is not None:
            script = read_text(a.prelaunch_script)
            if script.strip():
                compose["pre_launch_script"] = script
            else:
                compose.pop("pre_launch_script", None)
        if a.swap is not None:
            swap = swap_bytes(a.swap)
            if swap > 0:
                compose["swap_size"] = swap
            else:
                compose.pop("swap_size", None)
        req.compose_file = compose_bytes(compose).decode()
    if a.env_file:
        env_update(c, req, a.env_file, a.kms_url, a.yes)
    if a.user_config:
        req.user_config = read_text(a.user_config)
    if a.no_ports:
        req.update_ports = True
    elif a.port:
        req.update_ports = True
        req.ports.extend(port_mappings(a.port))
    if a.no_gpus:
        req.gpus.attach_mode = "listed"
    elif a.gpu or a.ppcie:
        gpus = gpu_config(a.gpu, a.ppcie)
        if gpus is not None:
            req.gpus.CopyFrom(gpus)
    if a.kms_url:
        req.update_kms_urls = True
        req.kms_urls.extend(a.kms_url)
    if a.tee is not None:
        req.no_tee = not a.tee
    return req if _sets_more_than_id(req) else None


def cmd_update(c: VmmClient, a: argparse.Namespace) -> None:
    resize = resize_request(a)
    upgrade = update_request(c, a)
    if resize is None and upgrade is None:
        raise CliError("nothing to update")
    if resize is not None:
        c.call("ResizeVm", resize, Empty)
    if upgrade is not None:
        c.call("UpgradeApp", upgrade, pb.Id)
    print(f"updated vm {a.vm_id}")


def _resource_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--vcpu", type=int)
    s.add_argument("--memory", metavar="SIZE")
    s.add_argument("--disk", metavar="SIZE")
    s.add_argument("--image")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("resize", help="change a stopped vm's resources")
    s.add_argument("vm_id")
    _resource_flags(s)
    s.set_defaults(func=cmd_resize)

    s = sub.add_parser("update-env", help="replace a vm's encrypted env")
    s.add_argument("vm_id")
    s.add_argument("--env-file", required=True, metavar="PATH")
    s.add_argument("--kms-url", action="append", metavar="URL")
    s.add_argument("-y", "--yes", action="store_true")
    s.set_defaults(func=cmd_update_env)

    s = sub.add_parser("update-app-compose", help="replace a vm's app-compose.json")
    s.add_argument("vm_id")
    s.add_argument("compose_path")
    s.set_defaults(func=cmd_update_app_compose)

    s = sub.add_parser("update-user-config", help="replace a vm's user config")
    s.add_argument("vm_id")
    s.add_argument("path")
    s.set_defaults(func=cmd_update_user_config)

    s = sub.add_parser("update-ports", help="replace a vm's port mappings")
    s.add_argument("vm_id")
    s.add_argument("--port", action="append", required=True, metavar="SPEC")
    s.set_defaults(func=cmd_update_ports)

    s = sub.add_parser("update", help="change several things of a vm at once")
    s.add_argument("vm_id")
    _resource_flags(s)
    s.add_argument("--compose", metavar="PATH", help="docker-compose file")
    s.add_argument("--prelaunch-script", metavar="PATH")
    s.add_argument("--env-file", metavar="PATH")
    s.add_argument("--user-config", metavar="PATH")
    ports = s.add_mutually_exclusive_group()
    ports.add_argument("--port", action="append", metavar="SPEC")
    ports.add_argument("--no-ports", action="store_true")
    s.add_argument("--swap", metavar="SIZE")
    gpus = s.add_mutually_exclusive_group()
    gpus.add_argument("--gpu", action="append", metavar="SLOT")
    gpus.add_argument("--ppcie", action="store_true")
    gpus.add_argument("--no-gpus", action="store_true")
    tee = s.add_mutually_exclusive_group()
    tee.add_argument("--no-tee", dest="tee", action="store_false", default=None)
    tee.add_argument("--tee", dest="tee", action="store_true")
    s.add_argument("--kms-url", action="append", metavar="URL")
    s.add_argument("-y", "--yes", action="store_true")
    s.set_defaults(func=cmd_update)
