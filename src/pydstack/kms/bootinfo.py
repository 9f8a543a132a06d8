"""BootInfo: what the KMS tells its authorization backend about a booting CVM.

camelCase JSON with hex bytes (no 0x), as upstream's `PolicyBootInfo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BootInfo:
    tee_variant: str
    mr_aggregated: bytes
    os_image_hash: bytes
    mr_system: bytes
    app_id: bytes
    compose_hash: bytes
    instance_id: bytes
    device_id: bytes
    key_provider_info: bytes
    tcb_status: str
    advisory_ids: tuple[str, ...] = ()

    def to_json_obj(self) -> dict[str, Any]:
        return {
            "teeVariant": self.tee_variant,
            "mrAggregated": self.mr_aggregated.hex(),
            "osImageHash": self.os_image_hash.hex(),
            "mrSystem": self.mr_system.hex(),
            "appId": self.app_id.hex(),
            "composeHash": self.compose_hash.hex(),
            "instanceId": self.instance_id.hex(),
            "deviceId": self.device_id.hex(),
            "keyProviderInfo": self.key_provider_info.hex(),
            "tcbStatus": self.tcb_status,
            "advisoryIds": list(self.advisory_ids),
        }

    @classmethod
    def from_json_obj(cls, obj: dict[str, Any]) -> BootInfo:
        def h(key: str) -> bytes:
            value = obj.get(key, "")
            if not isinstance(value, str):
                raise ValueError(f"boot info {key} must be a hex string")
            return bytes.fromhex(value.removeprefix("0x"))

        adv = obj.get("advisoryIds", [])
        if not isinstance(adv, list) or not all(isinstance(a, str) for a in adv):
            raise ValueError("boot info advisoryIds must be a list of strings")
        return cls(
            tee_variant=str(obj.get("teeVariant", "dstack-tdx")),
            mr_aggregated=h("mrAggregated"),
            os_image_hash=h("osImageHash"),
            mr_system=h("mrSystem"),
            app_id=h("appId"),
            compose_hash=h("composeHash"),
            instance_id=h("instanceId"),
            device_id=h("deviceId"),
            key_provider_info=h("keyProviderInfo"),
            tcb_status=str(obj.get("tcbStatus", "")),
            advisory_ids=tuple(adv),
        )
