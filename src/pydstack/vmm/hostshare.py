"""what the VMM writes into a VM's host share (the files the guest copies at boot).

At creation: `app-compose.json` (the exact bytes whose hash the CVM measures), `.instance_info`
with the app id, and the optional `.encrypted-env` and `.user-config`. At every start:
`.sys-config.json` (KMS, gateway and PCCS urls, the registry, the host API url, and `vm_config`
as a JSON string, as upstream writes it). The guest bounds every file it reads.
"""

from __future__ import annotations

import json
from typing import Any

from pydstack.types import hostshare as hs

from .config import VmmConfig
from .images import Image
from .workdir import VmManifest, VmWorkDir

#: bounds on what CreateVm/UpdateVm may put in the share (the guest's own caps)
MAX_ENV = 256 * 1024
MAX_USER_CONFIG = 1024 * 1024
#: a file earlier versions wrote into the share and that must not stay there
STALE_FILES = (".tee-simulator.json",)


def creation_files(
    compose: bytes, app_id: str, encrypted_env: bytes, user_config: str
) -> dict[str, bytes]:
    """the host share of a new VM."""
    files = {
        hs.APP_COMPOSE: compose,
        hs.INSTANCE_INFO: json.dumps({"app_id": app_id}).encode(),
    }
    if encrypted_env:
        files[hs.ENCRYPTED_ENV] = encrypted_env
    if user_config:
        files[hs.USER_CONFIG] = user_config.encode()
    return files


def sys_config(config: VmmConfig, m: VmManifest, image: Image, host_api_url: str) -> dict[str, Any]:
    """the `.sys-config.json` of the VM's next boot."""
    vm_config = {
        "spec_version": 1,
        "os_image_hash": image.digest,
        "cpu_count": m.vcpu,
        "memory_size": m.memory * 1024 * 1024,
        "image": m.image,
    }
    doc: dict[str, Any] = {
        "kms_urls": m.kms_urls or list(config.kms_urls),
        "gateway_urls": m.gateway_urls or list(config.gateway_urls),
        "pccs_url": config.pccs_url,
        "collateral_urls": {"pccs": config.pccs_url},
        "docker_registry": config.docker_registry,
        "host_api_url": host_api_url,
        "vm_config": json.dumps(vm_config, separators=(",", ":")),
    }
    if m.simulated_tee:  # the guest's td lives in the vmm, on its host api channel
        doc["simulated_tee"] = m.simulated_tee
    return doc


def write_boot_config(
    wd: VmWorkDir, config: VmmConfig, m: VmManifest, image: Image, host_api_url: str
) -> None:
    """before a boot: the fresh sys-config, and no stale file of an earlier version."""
    wd.write_shared(hs.SYS_CONFIG, json.dumps(sys_config(config, m, image, host_api_url)).encode())
    for name in STALE_FILES:  # earlier versions put the seed in .tee-simulator.json
        (wd.shared / name).unlink(missing_ok=True)


def write_updates(wd: VmWorkDir, compose: str, encrypted_env: bytes, user_config: str) -> None:
    """UpdateVm's share changes; an empty value leaves its file as it is (as upstream)."""
    if compose:
        wd.write_shared(hs.APP_COMPOSE, compose.encode())
    if encrypted_env:
        wd.write_shared(hs.ENCRYPTED_ENV, encrypted_env)
    if user_config:
        wd.write_shared(hs.USER_CONFIG, user_config.encode())
