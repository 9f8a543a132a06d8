"""app identity: compose hash, app id, instance id, device id and the aggregated measurements.

* mr_system = sha256(MRTD || RTMR0 || RTMR1 || RTMR2 || mr_key_provider), mr_key_provider =
  sha256(key_provider_info) or 32 zero bytes;
* mr_aggregated = sha256(MRTD || RTMR0-2 || RTMR3' [|| MR_CONFIG_ID || MR_OWNER ||
  MR_OWNER_CONFIG when any is non-zero]); RTMR3' is the full replay, or the replay up to
  `boot-mr-done` for the boot-time variant (which also empties key_provider_info);
* device_id = sha256(PPID) from a verified quote, sha256(b"") when unverified;
* MR_CONFIG_ID V1/V2/V3 as upstream.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from pydstack.crypto.keccak import keccak256
from pydstack.types import jsonlimits, msgpacklimits

from .attestation import Attestation
from .errors import ParseError
from .eventlog import replay_runtime_events
from .quote import TdReport, parse_quote

SYSTEM_READY = "system-ready"
BOOT_MR_DONE = "boot-mr-done"
APP_ID, COMPOSE_HASH, INSTANCE_ID = "app-id", "compose-hash", "instance-id"
KEY_PROVIDER, INIT_SCRIPT_HASH = "key-provider", "init-script-hash"
_IDENTITY_EVENTS = frozenset({APP_ID, COMPOSE_HASH, INSTANCE_ID, KEY_PROVIDER})
KEY_PROVIDER_KINDS = {"none": 0, "local": 1, "kms": 2, "tpm": 3}


def compose_hash(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


def app_id_from(compose_hash_: bytes, pinned: bytes = b"") -> bytes:
    app_id = pinned or compose_hash_[:20]
    if len(app_id) != 20:
        raise ValueError(f"app id must be 20 bytes, got {len(app_id)}")
    return app_id


def instance_id(seed: bytes, app_id: bytes, platform_binding: bytes | None = None) -> bytes:
    return hashlib.sha256(seed + app_id + (platform_binding or b"")).digest()[:20]


def device_id(ppid: bytes | None) -> bytes:
    return hashlib.sha256(ppid or b"").digest()


def mr_key_provider(key_provider_info: bytes) -> bytes:
    return hashlib.sha256(key_provider_info).digest() if key_provider_info else bytes(32)


def mr_system(mrtd: bytes, rtmr0: bytes, rtmr1: bytes, rtmr2: bytes, kp_info: bytes) -> bytes:
    return hashlib.sha256(mrtd + rtmr0 + rtmr1 + rtmr2 + mr_key_provider(kp_info)).digest()


def mr_aggregated(
    mrtd: bytes,
    rtmrs: Sequence[bytes],
    mr_config_id: bytes = bytes(48),
    mr_owner: bytes = bytes(48),
    mr_owner_config: bytes = bytes(48),
) -> bytes:
    h = hashlib.sha256(mrtd + b"".join(rtmrs))
    tail = mr_config_id + mr_owner + mr_owner_config
    if tail.strip(b"\0"):  # any non-zero byte
        h.update(tail)
    return h.digest()


def mr_config_id_v1(compose_hash_: bytes) -> bytes:
    return (b"\x01" + compose_hash_).ljust(48, b"\0")


def mr_config_id_v2(
    compose_hash_: bytes, app_id: bytes, key_provider: str, key_provider_id: bytes
) -> bytes:
    kind = KEY_PROVIDER_KINDS[key_provider]
    digest = keccak256(compose_hash_ + app_id + bytes([kind]) + key_provider_id)
    return (b"\x02" + digest).ljust(48, b"\0")


def mr_config_id_v3(document: bytes) -> bytes:
    return (b"\x03" + hashlib.sha256(b"dstack-mr-config-v3:\0" + document).digest()).ljust(
        48, b"\0"
    )


def key_provider_info_json(name: str, provider_id: bytes) -> bytes:
    return json.dumps({"name": name, "id": provider_id.hex()}, separators=(",", ":")).encode()


def os_image_hash_from_config(config: str) -> bytes:
    """os_image_hash of a vm_config (or of a whole sys-config carrying a nested vm_config).

    Never raises: anything malformed (not JSON within `jsonlimits`' bounds, no such field, not
    hex) gives b"". Linear time and memory."""
    try:
        obj = jsonlimits.loads(config) if config else {}
    except ValueError:
        return b""
    if isinstance(obj, dict) and "os_image_hash" not in obj and "vm_config" in obj:
        nested = obj["vm_config"]
        try:
            obj = jsonlimits.loads(nested) if isinstance(nested, str) else nested
        except ValueError:
            return b""
    value = obj.get("os_image_hash", "") if isinstance(obj, dict) else ""
    try:
        return bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        return b""


@dataclass(frozen=True, slots=True)
class AppInfo:
    app_id: bytes
    compose_hash: bytes
    instance_id: bytes
    device_id: bytes
    mr_system: bytes
    mr_aggregated: bytes
    os_image_hash: bytes
    key_provider_info: bytes
    init_script_hashes: tuple[bytes, ...] | None = None

    @classmethod
    def from_attestation(
        cls,
        att: Attestation,
        *,
        boottime_mr: bool,
        ppid: bytes | None = None,
        report: TdReport | None = None,
        os_image_hash: bytes | None = None,
    ) -> AppInfo:
        """decode identity from an attestation (TDX); `ppid` comes from a verified quote.
        `report`: the TD report of `att.quote` when the caller parsed it and checked that its
        RTMR3 is the replay of the runtime events (both are then not done again).
        `os_image_hash`: what `os_image_hash_from_config(att.config)` gives, when the caller
        has read the config already. ParseError when its quote does not parse or is not a TDX
        quote; linear time."""
        replayed = report is not None
        if report is None:
            report = parse_quote(att.quote).td_report
        if report is None:
            raise ParseError("attestation quote is not a tdx quote")
        events = att.runtime_events
        # before system-ready: the first payload of each identity event, every init script
        found: dict[str, bytes] = {}
        init_scripts: list[bytes] = []
        for ev in events:
            name = ev.event
            if name == SYSTEM_READY:
                break
            if name == INIT_SCRIPT_HASH:
                init_scripts.append(ev.payload)
            elif name in _IDENTITY_EVENTS and name not in found:
                found[name] = ev.payload
        kp_info = found.get(KEY_PROVIDER, b"")
        if boottime_mr:
            rtmr3 = replay_runtime_events(events, stop_after=BOOT_MR_DONE)
            kp_info = b""
        else:
            rtmr3 = report.rtmr3 if replayed else replay_runtime_events(events)
        if os_image_hash is None:
            os_image_hash = os_image_hash_from_config(att.config)
        return cls(
            app_id=found.get(APP_ID, b""),
            compose_hash=found.get(COMPOSE_HASH, b""),
            instance_id=found.get(INSTANCE_ID, b""),
            device_id=device_id(ppid),
            mr_system=mr_system(report.mr_td, report.rtmr0, report.rtmr1, report.rtmr2, kp_info),
            mr_aggregated=mr_aggregated(
                report.mr_td,
                (report.rtmr0, report.rtmr1, report.rtmr2, rtmr3),
                report.mr_config_id,
                report.mr_owner,
                report.mr_owner_config,
            ),
            os_image_hash=os_image_hash,
            key_provider_info=kp_info,
            init_script_hashes=tuple(init_scripts) if init_scripts else None,
        )

    def to_msgpack(self) -> bytes:
        """the positional msgpack array of the RA-TLS app-info extension (.1.9)."""
        doc: list[Any] = [
            self.app_id,
            self.compose_hash,
            self.instance_id,
            self.device_id,
            self.mr_system,
            self.mr_aggregated,
            self.os_image_hash,
            self.key_provider_info,
            None if self.init_script_hashes is None else list(self.init_script_hashes),
        ]
        out: bytes = msgpack.packb(doc, use_bin_type=True)
        return out

    @classmethod
    def from_msgpack(cls, data: bytes) -> AppInfo:
        """the app-info extension's msgpack array; ParseError if it is not one (over 1 MiB,
        not msgpack, not an array of 8 or 9 items, an item of the wrong type or length).
        msgpack's own limits follow the input's length; linear time and memory."""
        if len(data) > 1024 * 1024:
            raise ParseError("app info too large")
        try:
            doc = msgpacklimits.loads(data, max_depth=4)
        except msgpacklimits.MsgpackError as e:
            raise ParseError(f"app info is not valid msgpack: {e}") from e
        if not isinstance(doc, list) or len(doc) not in (8, 9):
            raise ParseError("app info must be a msgpack array of 8 or 9 items")

        def b(i: int, size: int | None = None) -> bytes:
            v = doc[i]
            if isinstance(v, list) and all(isinstance(x, int) and 0 <= x < 256 for x in v):
                v = bytes(v)
            if not isinstance(v, bytes) or (size is not None and len(v) != size):
                raise ParseError(f"app info item {i} must be bytes")
            return v

        scripts = doc[8] if len(doc) == 9 else None
        if scripts is not None and (
            not isinstance(scripts, list) or not all(isinstance(s, bytes) for s in scripts)
        ):
            raise ParseError("app info init_script_hashes must be a list of bytes")
        return cls(
            b(0),
            b(1),
            b(2),
            b(3),
            b(4, 32),
            b(5, 32),
            b(6),
            b(7),
            None if scripts is None else tuple(scripts),
        )
