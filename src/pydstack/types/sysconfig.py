"""`.sys-config.json`: what the host tells the guest (KMS and gateway URLs, vm_config...)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydstack.errors import InputError
from pydstack.types import jsonlimits
from pydstack.types.capped import read_capped

MAX_SYS_CONFIG_SIZE = 1024 * 1024


class SysConfigError(InputError):
    """a `.sys-config.json` document is malformed."""


@dataclass(frozen=True)
class SysConfig:
    kms_urls: tuple[str, ...] = ()
    gateway_urls: tuple[str, ...] = ()
    pccs_url: str = ""
    docker_registry: str = ""
    host_api_url: str = ""
    #: the vm_config JSON *string*, echoed verbatim by Info and GetQuote
    vm_config: str = ""
    #: a pydstack extension: the VMM plays this TEE for the VM (`dstack-tdx`: its TD is reached
    #: over the host API channel); a dev image uses it only when it is set, as upstream's
    #: no-TEE mode uses `.tee-simulator.json`
    simulated_tee: str = ""

    @classmethod
    def from_json(cls, data: bytes | str) -> SysConfig:
        """SysConfigError unless `data` is a JSON object (within `jsonlimits`' bounds, at
        most `MAX_SYS_CONFIG_SIZE`) whose known fields have their types; linear time."""
        obj = jsonlimits.load_object(
            data, "sys-config", max_bytes=MAX_SYS_CONFIG_SIZE, error=SysConfigError
        )
        vm_config = obj.get("vm_config", "")
        if isinstance(vm_config, dict):
            vm_config = json.dumps(vm_config, separators=(",", ":"))
        if not isinstance(vm_config, str):
            raise SysConfigError("sys-config vm_config must be a string")
        return cls(
            kms_urls=_str_list(obj, "kms_urls"),
            gateway_urls=_str_list(obj, "gateway_urls"),
            pccs_url=_opt_str(obj, "pccs_url"),
            docker_registry=_opt_str(obj, "docker_registry"),
            host_api_url=_opt_str(obj, "host_api_url"),
            vm_config=vm_config,
            simulated_tee=_opt_str(obj, "simulated_tee"),
        )

    @classmethod
    def load(cls, path: Path) -> SysConfig:
        try:
            with open(path, "rb") as f:
                data = read_capped(f, MAX_SYS_CONFIG_SIZE)
        except OSError as e:
            raise SysConfigError(f"cannot read sys-config {path}: {e.strerror}") from e
        return cls.from_json(data)

    def to_json(self) -> str:
        return json.dumps(
            {
                "kms_urls": list(self.kms_urls),
                "gateway_urls": list(self.gateway_urls),
                "pccs_url": self.pccs_url,
                "docker_registry": self.docker_registry,
                "host_api_url": self.host_api_url,
                "vm_config": self.vm_config,
            },
            indent=4,
        )

    @property
    def vm_config_obj(self) -> dict[str, Any]:
        """vm_config parsed (empty when absent or not an object)."""
        try:
            obj = jsonlimits.loads(self.vm_config) if self.vm_config else {}
        except ValueError:
            return {}
        return obj if isinstance(obj, dict) else {}

    @property
    def os_image_hash(self) -> bytes:
        value = self.vm_config_obj.get("os_image_hash", "")
        try:
            return bytes.fromhex(value) if isinstance(value, str) else b""
        except ValueError:
            return b""


def _str_list(obj: dict[str, Any], key: str) -> tuple[str, ...]:
    value = obj.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SysConfigError(f"sys-config {key} must be a list of strings")
    return tuple(value)


def _opt_str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key) or ""
    if not isinstance(value, str):
        raise SysConfigError(f"sys-config {key} must be a string")
    return value
