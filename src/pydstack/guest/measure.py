"""what a booting CVM measures into RTMR3, in upstream's order.

Stage one (before any key is requested): `system-preparing`, `app-id`, `compose-hash`,
`init-script-hash` per init script, `instance-id`, `boot-mr-done`. Stage two (after the key
provider answered): `os-image-hash` (KMS only), `key-provider`, `storage-fs`, `system-ready`.
The simulator and every CVM backend run the same functions, so their event logs have one shape.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Protocol

from pydstack.attest.eventlog import RuntimeEvent

from .instance import InstanceInfo


class Rtmr3Sink(Protocol):
    """anything that extends RTMR3 and appends the event to its log as one step."""

    def extend_rtmr3(self, event: RuntimeEvent) -> None: ...


@dataclass(frozen=True)
class AppIdentity:
    """the identity stage one measured."""

    app_id: bytes
    compose_hash: bytes
    instance_id: bytes
    instance_info: InstanceInfo


def derive_instance_identity(
    compose_raw: bytes, instance_info: InstanceInfo, *, no_instance_id: bool = False
) -> tuple[bytes, bytes, bytes, InstanceInfo]:
    """app_id, compose_hash, instance_id and the (possibly updated) instance info.

    app_id is the deploy-time pin when present, else compose_hash[:20]; instance_id is
    sha256(instance_id_seed || app_id)[:20] with a fresh 20-byte seed when none was kept.
    """
    compose_hash = hashlib.sha256(compose_raw).digest()
    app_id = instance_info.app_id or compose_hash[:20]
    if len(app_id) != 20:
        raise ValueError(f"app id must be 20 bytes, got {len(app_id)}")
    if no_instance_id:
        return app_id, compose_hash, b"", InstanceInfo(b"", b"", instance_info.app_id)
    seed = instance_info.instance_id_seed or os.urandom(20)
    instance_id = hashlib.sha256(seed + app_id).digest()[:20]
    return app_id, compose_hash, instance_id, InstanceInfo(seed, instance_id, instance_info.app_id)


def measure_stage1(
    sink: Rtmr3Sink,
    compose_raw: bytes,
    instance_info: InstanceInfo,
    *,
    init_scripts: tuple[str, ...] = (),
    no_instance_id: bool = False,
    version: int = 1,
) -> AppIdentity:
    """measure the app's identity; returns it with the instance info to persist."""
    app_id, compose_hash, instance_id, info = derive_instance_identity(
        compose_raw, instance_info, no_instance_id=no_instance_id
    )
    sink.extend_rtmr3(RuntimeEvent("system-preparing", b"", version))
    sink.extend_rtmr3(RuntimeEvent("app-id", app_id, version))
    sink.extend_rtmr3(RuntimeEvent("compose-hash", compose_hash, version))
    for script in init_scripts:
        digest = hashlib.sha256(script.encode()).digest()
        sink.extend_rtmr3(RuntimeEvent("init-script-hash", digest, version))
    sink.extend_rtmr3(RuntimeEvent("instance-id", instance_id, version))
    sink.extend_rtmr3(RuntimeEvent("boot-mr-done", b"", version))
    return AppIdentity(app_id, compose_hash, instance_id, info)


def key_provider_info(name: str, provider_id: bytes) -> bytes:
    """the compact `{"name": ..., "id": ...}` payload of the `key-provider` event."""
    return json.dumps({"name": name, "id": provider_id.hex()}, separators=(",", ":")).encode()


def measure_stage2(
    sink: Rtmr3Sink,
    *,
    key_provider: bytes,
    storage_fs: str,
    os_image_hash: bytes | None = None,
    version: int = 1,
) -> None:
    """measure what the key provider answered and the storage, then mark the system ready."""
    if os_image_hash is not None:
        sink.extend_rtmr3(RuntimeEvent("os-image-hash", os_image_hash, version))
    sink.extend_rtmr3(RuntimeEvent("key-provider", key_provider, version))
    sink.extend_rtmr3(RuntimeEvent("storage-fs", storage_fs.encode(), version))
    sink.extend_rtmr3(RuntimeEvent("system-ready", b"", version))
