"""client-side helpers of the `dstack` CLI: app-compose generation and argument parsing.

The app-compose is written exactly as upstream's vmm-cli writes it (key order, 4-space indent,
UTF-8), because its bytes are the compose hash the CVM measures and the KMS authorizes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from pydstack.errors import InputError

KEY_PROVIDERS = ("none", "kms", "local", "tpm")


class ArgError(InputError):
    """a command-line value is malformed."""


def make_app_compose(
    *,
    name: str,
    docker_compose: str,
    kms: bool = False,
    gateway: bool = False,
    local_key_provider: bool = False,
    key_provider: str | None = None,
    key_provider_id: str = "",
    public_logs: bool = False,
    public_sysinfo: bool = False,
    allowed_envs: list[str] | None = None,
    no_instance_id: bool = False,
    secure_time: bool = False,
    prelaunch_script: str | None = None,
    swap_bytes: int = 0,
    event_log_version: int = 1,
) -> dict[str, Any]:
    if not name:
        raise ArgError("the app needs a name")
    if key_provider is not None and key_provider not in KEY_PROVIDERS:
        raise ArgError(f"key provider must be one of {', '.join(KEY_PROVIDERS)}")
    if key_provider_id and not re.fullmatch(r"(0x)?[0-9a-fA-F]*", key_provider_id):
        raise ArgError("key provider id must be hex")
    if event_log_version not in (1, 2):
        raise ArgError("event log version must be 1 or 2")
    doc: dict[str, Any] = {
        "manifest_version": 2,
        "name": name,
        "runner": "docker-compose",
        "docker_compose_file": docker_compose,
        "kms_enabled": kms,
        "gateway_enabled": gateway,
        "local_key_provider_enabled": local_key_provider,
        "key_provider_id": key_provider_id.removeprefix("0x"),
        "public_logs": public_logs,
        "public_sysinfo": public_sysinfo,
        "allowed_envs": list(allowed_envs or []),
        "no_instance_id": no_instance_id,
        "secure_time": secure_time,
    }
    if key_provider is not None:
        doc["key_provider"] = key_provider
    if prelaunch_script:
        doc["pre_launch_script"] = prelaunch_script
    if swap_bytes > 0:
        doc["swap_size"] = swap_bytes
    if event_log_version == 2:
        doc["event_log_version"] = 2
    return doc


def compose_bytes(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=4, ensure_ascii=False).encode()


def compose_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def app_id_of(raw: bytes) -> str:
    return compose_hash(raw)[:40]


_MEM = {"": 1, "M": 1, "MB": 1, "G": 1024, "GB": 1024, "T": 1024**2, "TB": 1024**2}
_DISK = {"": 1, "G": 1, "GB": 1, "T": 1024, "TB": 1024}


def _size(value: str, units: dict[str, int], what: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value, re.ASCII)
    if not m or m.group(2).upper() not in units:
        raise ArgError(f"invalid {what} size {value!r}")
    amount = float(m.group(1)) * units[m.group(2).upper()]
    if amount != int(amount) or amount <= 0:
        raise ArgError(f"{what} size {value!r} must be a positive whole number of units")
    return int(amount)


def parse_memory_mb(value: str) -> int:
    """`1024`, `512M`, `2G`, `1T` -> megabytes."""
    return _size(value, _MEM, "memory")


def parse_disk_gb(value: str) -> int:
    """`20`, `20G`, `1T` -> gigabytes."""
    return _size(value, _DISK, "disk")


@dataclass(frozen=True)
class PortMapping:
    protocol: str
    address: str
    host_port: int
    vm_port: int

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "host_address": self.address,
            "host_port": self.host_port,
            "vm_port": self.vm_port,
        }


def parse_port(spec: str) -> PortMapping:
    """`proto:host_port:vm_port` or `proto:host_addr:host_port:vm_port` (address 127.0.0.1)."""
    parts = spec.split(":")
    if len(parts) == 3:
        proto, host, vm = parts
        addr = "127.0.0.1"
    elif len(parts) == 4:
        proto, addr, host, vm = parts
    else:
        raise ArgError(f"invalid port spec {spec!r}: expected proto:[addr:]host_port:vm_port")
    if proto not in ("tcp", "udp"):
        raise ArgError(f"invalid port protocol {proto!r}: tcp or udp")
    try:
        host_port, vm_port = int(host), int(vm)
    except ValueError:
        raise ArgError(f"invalid port numbers in {spec!r}") from None
    if not (0 < host_port < 65536 and 0 < vm_port < 65536):
        raise ArgError(f"port numbers out of range in {spec!r}")
    return PortMapping(proto, addr, host_port, vm_port)


def parse_env_file(text: str) -> list[tuple[str, str]]:
    """`KEY=VALUE` lines; `#` comments and lines without `=` skipped; no quote handling."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out.append((key.strip(), value.strip()))
    return out
