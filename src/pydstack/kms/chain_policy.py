"""the whole on-chain policy of a KMS or an app, as an operator reads it.

The contracts keep their allowlists in mappings, which cannot be listed; their add/remove events
can. `kms_policy` / `app_policy` replay those events (from `from_block`, in block and log order)
and keep a value only when the contract's getter still says it is allowed, with the block of its
last addition. Values added before `from_block` are missed; a node that limits log ranges needs
`from_block` near the contract's deployment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_utils.address import to_checksum_address

from .chain import Chain
from .chain_abi import ChainError


@dataclass(frozen=True)
class Listed:
    """an allowed value (0x hex, or a checksummed address) and the block that last added it."""

    value: str
    block: int

    def to_json_obj(self) -> dict[str, Any]:
        return {"value": self.value, "block": self.block}


#: list name -> (getter, event that adds, event that removes or None)
Lists = dict[str, tuple[str, str, str | None]]
KMS_LISTS: Lists = {
    "os_images": ("allowedOsImages", "OsImageHashAdded", "OsImageHashRemoved"),
    "kms_aggregated_mrs": (
        "kmsAllowedAggregatedMrs",
        "KmsAggregatedMrAdded",
        "KmsAggregatedMrRemoved",
    ),
    "kms_devices": ("kmsAllowedDeviceIds", "KmsDeviceAdded", "KmsDeviceRemoved"),
    "registered_apps": ("registeredApps", "AppRegistered", None),
}
APP_LISTS: Lists = {
    "compose_hashes": ("allowedComposeHashes", "ComposeHashAdded", "ComposeHashRemoved"),
    "devices": ("allowedDeviceIds", "DeviceAdded", "DeviceRemoved"),
}
#: DstackApp keeps `_upgradesDisabled` private: slot 1, offset 0 (the layout test pins it)
UPGRADES_DISABLED_SLOT = 1


def _shown(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return to_checksum_address(str(value))


def _lists(chain: Chain, contract: Any, lists: Lists, from_block: int) -> dict[str, list[Listed]]:
    events: dict[str, tuple[str, bool]] = {}
    for name, (_, added, removed) in lists.items():
        events[added] = (name, True)
        if removed:
            events[removed] = (name, False)
    topics = {bytes.fromhex(contract.events[e]().topic[2:]): e for e in events}
    # list name -> shown value -> (the value as the getter takes it, block of the last addition)
    state: dict[str, dict[str, tuple[Any, int]]] = {name: {} for name in lists}
    logs = sorted(
        chain.logs(contract.address, from_block),
        key=lambda log: (log["blockNumber"], log["logIndex"]),
    )
    for log in logs:
        event = topics.get(bytes(log["topics"][0])) if log.get("topics") else None
        if event is None:
            continue
        (value,) = contract.events[event]().process_log(log)["args"].values()
        target, enabled = events[event]
        if enabled:
            state[target][_shown(value)] = (value, int(log["blockNumber"]))
        else:
            state[target].pop(_shown(value), None)
    out: dict[str, list[Listed]] = {}
    for name, (getter, _, _) in lists.items():
        fn = getattr(contract.functions, getter)
        entries = sorted(state[name].items(), key=lambda kv: (kv[1][1], kv[0]))
        out[name] = [Listed(shown, block) for shown, (v, block) in entries if chain.read(fn(v))]
    return out


def _optional(chain: Chain, fn: Any) -> Any:
    """a getter older or foreign app contracts may lack: None when it reverts."""
    try:
        return chain.read(fn)
    except ChainError:
        return None


def _owner(chain: Chain, contract: Any) -> dict[str, Any]:
    pending = str(chain.read(contract.functions.pendingOwner()))
    return {
        "owner": str(chain.read(contract.functions.owner())),
        "pending_owner": None if int(pending, 16) == 0 else pending,
    }


def kms_policy(chain: Chain, kms: Any, from_block: int = 0) -> dict[str, Any]:
    """the KMS's settings and lists (see the module doc)."""
    f = kms.functions
    k256, ca, quote, eventlog = chain.read(f.kmsInfo())
    info: dict[str, Any] = {
        "kms": kms.address,
        "implementation": chain.implementation(kms.address),
        **_owner(chain, kms),
        "gateway_app_id": str(chain.read(f.gatewayAppId())),
        "app_implementation": str(chain.read(f.appImplementation())),
        "kms_info": {
            "k256_pubkey": "0x" + bytes(k256).hex(),
            "ca_pubkey": "0x" + bytes(ca).hex(),
            "quote_bytes": len(quote),
            "eventlog_bytes": len(eventlog),
        },
    }
    for name, entries in _lists(chain, kms, KMS_LISTS, from_block).items():
        info[name] = [e.to_json_obj() for e in entries]
    return info


def upgrades_disabled(chain: Chain, app_address: str) -> bool:
    return chain.storage_word(app_address, UPGRADES_DISABLED_SLOT)[31] != 0


def app_policy(chain: Chain, kms: Any, app: Any, from_block: int = 0) -> dict[str, Any]:
    """one app's settings and lists, and whether `kms` registers it."""
    f = app.functions
    info: dict[str, Any] = {
        "app": app.address,
        "implementation": chain.implementation(app.address),
        **_owner(chain, app),
        "registered": bool(chain.read(kms.functions.registeredApps(app.address))),
        "version": _optional(chain, f.version()),
        "allow_any_device": _optional(chain, f.allowAnyDevice()),
        "require_tcb_up_to_date": _optional(chain, f.requireTcbUpToDate()),
        "upgrades_disabled": upgrades_disabled(chain, app.address),
    }
    for name, entries in _lists(chain, app, APP_LISTS, from_block).items():
        info[name] = [e.to_json_obj() for e in entries]
    return info
