"""`dstack compose` (writes an app-compose.json, locally) and `dstack deploy` (CreateVm)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pydstack.rpc.proto import vmm_rpc_pb2 as pb

from ..compose import (
    KEY_PROVIDERS,
    app_id_of,
    compose_bytes,
    compose_hash,
    make_app_compose,
    parse_disk_gb,
    parse_memory_mb,
    parse_port,
)
from .common import CliError, VmmClient, read_text
from .envkeys import encrypt_env_file, env_file

#: upstream vmm-cli's `--simulated-tee` choices (the TEE ABI a no-TEE dev VM simulates)
SIMULATED_TEES = (
    "dstack-tdx",
    "dstack-gcp-tdx",
    "dstack-amd-sev-snp",
    "dstack-nitro-enclave",
    "dstack-aws-nitro-tpm",
)


def swap_bytes(value: str | None) -> int:
    return parse_memory_mb(value) * 1024 * 1024 if value else 0


def port_mappings(specs: list[str] | None) -> list[pb.PortMapping]:
    out = []
    for spec in specs or []:
        p = parse_port(spec)
        out.append(
            pb.PortMapping(
                protocol=p.protocol,
                host_address=p.address,
                host_port=p.host_port,
                vm_port=p.vm_port,
            )
        )
    return out


def gpu_config(gpus: list[str] | None, ppcie: bool) -> pb.GpuConfig | None:
    if ppcie or (gpus and "all" in gpus):
        return pb.GpuConfig(attach_mode="all")
    if gpus:
        return pb.GpuConfig(attach_mode="listed", gpus=[pb.GpuSpec(slot=g) for g in gpus])
    return None


def load_compose(path: str) -> tuple[str, dict[str, Any]]:
    """an app-compose.json's exact text and its parsed object."""
    text = read_text(path)
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise CliError(f"{path} is not an app-compose json file: {e}") from e
    if not isinstance(doc, dict):
        raise CliError(f"{path} is not an app-compose json object")
    return text, doc


def cmd_compose(c: VmmClient | None, a: argparse.Namespace) -> None:
    if a.env_file and not a.kms:
        raise CliError("--env-file needs --kms (env vars are encrypted to the kms's key)")
    envs = env_file(a.env_file) if a.env_file else []
    doc = make_app_compose(
        name=a.name,
        docker_compose=read_text(a.docker_compose),
        kms=a.kms,
        gateway=a.gateway,
        local_key_provider=a.local_key_provider,
        key_provider=a.key_provider,
        key_provider_id=a.key_provider_id or "",
        public_logs=a.public_logs,
        public_sysinfo=a.public_sysinfo,
        allowed_envs=[k for k, _ in envs],
        no_instance_id=a.no_instance_id,
        secure_time=a.secure_time,
        prelaunch_script=read_text(a.prelaunch_script) if a.prelaunch_script else None,
        swap_bytes=swap_bytes(a.swap),
        event_log_version=a.event_log_version,
    )
    raw = compose_bytes(doc)
    Path(a.output).write_bytes(raw)
    print(f"App compose file created at: {a.output}")
    print(f"Compose hash: {compose_hash(raw)}")


def create_request(a: argparse.Namespace) -> pb.VmConfiguration:
    """the CreateVm message `deploy` sends (the env is encrypted here, to the kms's key)."""
    compose_text, compose = load_compose(a.compose)
    if a.swap is not None:  # swap lives in the app compose (it is measured)
        swap = swap_bytes(a.swap)
        if swap != compose.get("swap_size", 0):
            if swap:
                compose["swap_size"] = swap
            else:
                compose.pop("swap_size", None)
            compose_text = compose_bytes(compose).decode()
    app_id = (a.app_id or app_id_of(compose_text.encode())).removeprefix("0x")
    print(f"App ID: {app_id}")
    req = pb.VmConfiguration(
        name=a.name,
        image=a.image,
        compose_file=compose_text,
        vcpu=a.vcpu,
        memory=parse_memory_mb(a.memory),
        disk_size=parse_disk_gb(a.disk),
        app_id=app_id,
        ports=port_mappings(a.port),
        hugepages=a.hugepages,
        pin_numa=a.pin_numa,
        stopped=a.stopped,
        no_tee=a.no_tee,
        kms_urls=a.kms_url or [],
        gateway_urls=a.gateway_url or [],
    )
    if a.simulated_tee:  # the vmm runs such a vm without the real tee (no_tee forced)
        req.simulated_tee = a.simulated_tee
    if a.net:
        req.networking.mode = a.net
    if a.user_config:
        req.user_config = read_text(a.user_config)
    gpus = gpu_config(a.gpu, a.ppcie)
    if gpus is not None:
        req.gpus.CopyFrom(gpus)
    if a.env_file:
        if not compose.get("kms_enabled") and compose.get("key_provider") != "kms":
            raise CliError("--env-file needs an app compose with the kms enabled")
        kms = a.kms_encrypt_url or (a.kms_url[0] if a.kms_url else "")
        if not kms:
            raise CliError("--env-file needs --kms-url (or --kms-encrypt-url) to encrypt to")
        req.encrypted_env, _ = encrypt_env_file(a.env_file, kms, app_id, a.yes)
    return req


def cmd_deploy(c: VmmClient, a: argparse.Namespace) -> None:
    r = c.call("CreateVm", create_request(a), pb.Id)
    print(f"Created VM with ID: {r.id}")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("compose", help="write an app-compose.json (local)")
    s.add_argument("--name", required=True)
    s.add_argument("--docker-compose", required=True, metavar="PATH")
    s.add_argument("--prelaunch-script", metavar="PATH")
    s.add_argument("--kms", action="store_true", help="get keys from the kms")
    s.add_argument("--gateway", action="store_true")
    s.add_argument("--local-key-provider", action="store_true")
    s.add_argument("--key-provider", choices=KEY_PROVIDERS)
    s.add_argument("--key-provider-id", metavar="HEX")
    s.add_argument("--public-logs", action="store_true")
    s.add_argument("--public-sysinfo", action="store_true")
    s.add_argument("--env-file", metavar="PATH", help="its keys become allowed_envs")
    s.add_argument("--no-instance-id", action="store_true")
    s.add_argument("--secure-time", action="store_true")
    s.add_argument("--swap", metavar="SIZE")
    s.add_argument("--event-log-version", type=int, choices=(1, 2), default=1)
    s.add_argument("--output", required=True, metavar="PATH")
    s.set_defaults(func=cmd_compose, local=True)

    s = sub.add_parser("deploy", help="create a vm from an app-compose.json")
    s.add_argument("--name", required=True)
    s.add_argument("--image", required=True)
    s.add_argument("--compose", required=True, metavar="PATH", help="app-compose.json")
    s.add_argument("--vcpu", type=int, default=1)
    s.add_argument("--memory", default="1024", help="MB, or with M/G/T suffix")
    s.add_argument("--disk", default="20", help="GB, or with G/T suffix")
    s.add_argument("--swap", metavar="SIZE")
    s.add_argument("--env-file", metavar="PATH")
    s.add_argument("--user-config", metavar="PATH")
    s.add_argument("--app-id", metavar="HEX")
    s.add_argument("--port", action="append", metavar="SPEC", help="proto:[addr:]host:vm")
    s.add_argument("--gpu", action="append", metavar="SLOT")
    s.add_argument("--ppcie", action="store_true")
    s.add_argument("--pin-numa", action="store_true")
    s.add_argument("--hugepages", action="store_true")
    s.add_argument("--kms-url", action="append", metavar="URL")
    s.add_argument("--kms-encrypt-url", metavar="URL")
    s.add_argument("--gateway-url", action="append", metavar="URL")
    s.add_argument("--stopped", action="store_true", help="create without starting")
    s.add_argument("--no-tee", dest="no_tee", action="store_true")
    s.add_argument("--tee", dest="no_tee", action="store_false")
    s.add_argument(
        "--simulated-tee",
        choices=SIMULATED_TEES,
        help="simulate this TEE's ABI for the vm (development images; the vmm forces no-tee)",
    )
    s.add_argument("--net", choices=("bridge", "user"), default=None)
    s.add_argument("-y", "--yes", action="store_true", help="accept an unsigned env key")
    s.set_defaults(func=cmd_deploy)
