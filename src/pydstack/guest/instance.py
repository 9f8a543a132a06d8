"""`.instance_info`: the instance identity the host keeps between boots.

JSON `{"instance_id_seed": hex, "instance_id": hex, "app_id": hex}`; `app_id` optionally pins the
app id at deploy time (else it is the first 20 bytes of the compose hash).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydstack.errors import InputError
from pydstack.types import jsonlimits
from pydstack.types.capped import read_capped

MAX_INSTANCE_INFO_SIZE = 64 * 1024


class InstanceInfoError(InputError):
    """an `.instance_info` document is malformed."""


@dataclass(frozen=True)
class InstanceInfo:
    instance_id_seed: bytes = b""
    instance_id: bytes = b""
    app_id: bytes = b""

    @classmethod
    def from_json(cls, data: bytes | str) -> InstanceInfo:
        """InstanceInfoError unless `data` is blank or a JSON object (within `jsonlimits`'
        bounds, at most `MAX_INSTANCE_INFO_SIZE`) whose fields are hex; linear time."""
        obj = jsonlimits.load_object(
            data,
            "instance info",
            max_bytes=MAX_INSTANCE_INFO_SIZE,
            error=InstanceInfoError,
            allow_empty=True,
        )
        return cls(
            instance_id_seed=_hex(obj, "instance_id_seed"),
            instance_id=_hex(obj, "instance_id"),
            app_id=_hex(obj, "app_id"),
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "instance_id_seed": self.instance_id_seed.hex(),
                "instance_id": self.instance_id.hex(),
                "app_id": self.app_id.hex(),
            }
        )

    @classmethod
    def load(cls, path: Path) -> InstanceInfo:
        try:
            with open(path, "rb") as f:
                return cls.from_json(read_capped(f, MAX_INSTANCE_INFO_SIZE))
        except FileNotFoundError:
            return cls()
        except OSError as e:
            raise InstanceInfoError(f"cannot read instance info {path}: {e.strerror}") from e

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)


def _hex(obj: dict[str, Any], key: str) -> bytes:
    value = obj.get(key) or ""
    if not isinstance(value, str):
        raise InstanceInfoError(f"instance info field {key} must be a hex string")
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError as e:
        raise InstanceInfoError(f"instance info field {key} is not valid hex") from e
