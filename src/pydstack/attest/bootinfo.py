"""BootInfo: what a verifier tells an authorization backend about a booting CVM (the KMS's
bootAuth payload, the verifier service's `boot_info`).

camelCase JSON with hex bytes (no 0x), as upstream's `PolicyBootInfo`. The hash fields are
32 bytes exactly: `length_error` says which one is not (a 31-byte compose hash must never be
padded into a whitelisted one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HASH_LEN = 32
#: hash fields that may be empty (unknown); when present they must be HASH_LEN bytes
OPTIONAL_HASHES = ("device_id", "mr_aggregated", "mr_system", "os_image_hash")


@dataclass(frozen=True, slots=True)
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

    def length_error(self) -> str:
        """'' when the hash fields have their length, else a reason naming the first that does
        not: compose_hash must be 32 bytes, the others 32 bytes when present."""
        if len(self.compose_hash) != HASH_LEN:
            return f"compose hash must be {HASH_LEN} bytes, got {len(self.compose_hash)}"
        for name in OPTIONAL_HASHES:
            value: bytes = getattr(self, name)
            if value and len(value) != HASH_LEN:
                what = name.replace("_", " ")
                return f"{what} must be {HASH_LEN} bytes, got {len(value)}"
        return ""

    def kms_identity(self) -> str:
        """what an operator registers to let a KMS boot (device id, aggregated MR, OS image),
        as `device id 0x.., mr aggregated 0x.., os image 0x..`: none of it is secret."""
        return (
            f"device id 0x{self.device_id.hex()}, mr aggregated 0x{self.mr_aggregated.hex()}, "
            f"os image 0x{self.os_image_hash.hex()}"
        )

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
