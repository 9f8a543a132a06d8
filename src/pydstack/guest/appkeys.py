"""`.appkeys.json`: the keys a CVM receives from its key provider.

Upstream's `AppKeys` document: hex `disk_crypt_key`, `env_crypt_key`, `k256_key`,
`k256_signature`, the `gateway_app_id` string, the `ca_cert` PEM and an externally tagged
`key_provider` (`{"None": {"key": PEM}}`, `{"Local": {"key", "mr"}}`, `{"Tpm": {"key", "pubkey"}}`,
`{"Kms": {"url", "pubkey", "tmp_ca_key", "tmp_ca_cert"}}`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydstack.errors import InputError
from pydstack.types import jsonlimits
from pydstack.types.capped import read_capped

MAX_APPKEYS_SIZE = 256 * 1024
KEY_PROVIDER_KINDS = ("None", "Local", "Tpm", "Kms")


class AppKeysError(InputError):
    """an `.appkeys.json` document is malformed."""


@dataclass(frozen=True)
class KeyProvider:
    """which provider issued the keys, with its provider-specific fields (strings)."""

    kind: str
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """the lower-case provider name used in the `key-provider` event (`none`, `kms`...)."""
        return {"None": "none", "Local": "local-sgx", "Tpm": "tpm", "Kms": "kms"}[self.kind]

    @property
    def key_pem(self) -> str:
        """the CA private key that signs certificates locally (None/Local/Tpm providers)."""
        return self.fields.get("key", "")


@dataclass(frozen=True)
class AppKeys:
    """the keys of one app instance."""

    disk_crypt_key: bytes
    env_crypt_key: bytes
    k256_key: bytes
    k256_signature: bytes
    gateway_app_id: str
    ca_cert: str
    key_provider: KeyProvider

    @classmethod
    def from_json(cls, data: bytes | str) -> AppKeys:
        """AppKeysError unless `data` is a JSON object (within `jsonlimits`' bounds, at most
        `MAX_APPKEYS_SIZE`) with hex keys, string fields and one known key provider whose
        fields are strings; linear time."""
        obj = jsonlimits.load_object(
            data, "appkeys", max_bytes=MAX_APPKEYS_SIZE, error=AppKeysError
        )
        return cls(
            disk_crypt_key=_hex(obj, "disk_crypt_key"),
            env_crypt_key=_hex(obj, "env_crypt_key"),
            k256_key=_hex(obj, "k256_key"),
            k256_signature=_hex(obj, "k256_signature"),
            gateway_app_id=_str(obj, "gateway_app_id"),
            ca_cert=_str(obj, "ca_cert"),
            key_provider=_key_provider(obj.get("key_provider")),
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "disk_crypt_key": self.disk_crypt_key.hex(),
                "env_crypt_key": self.env_crypt_key.hex(),
                "k256_key": self.k256_key.hex(),
                "k256_signature": self.k256_signature.hex(),
                "gateway_app_id": self.gateway_app_id,
                "ca_cert": self.ca_cert,
                "key_provider": {self.key_provider.kind: dict(self.key_provider.fields)},
            },
            indent=4,
        )

    @classmethod
    def load(cls, path: Path) -> AppKeys:
        try:
            with open(path, "rb") as f:
                data = read_capped(f, MAX_APPKEYS_SIZE)
        except OSError as e:
            raise AppKeysError(f"cannot read appkeys {path}: {e.strerror}") from e
        return cls.from_json(data)

    def save(self, path: Path) -> None:
        """write the keys with mode 0600 (atomically)."""
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)


def _hex(obj: dict[str, Any], key: str) -> bytes:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise AppKeysError(f"appkeys field {key} must be a hex string")
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError as e:
        raise AppKeysError(f"appkeys field {key} is not valid hex") from e


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise AppKeysError(f"appkeys field {key} must be a string")
    return value


def _key_provider(value: Any) -> KeyProvider:
    if value is None:
        return KeyProvider("None", {})
    if not isinstance(value, dict) or len(value) != 1:
        raise AppKeysError("appkeys key_provider must be an object with exactly one variant")
    ((kind, fields),) = value.items()
    if kind not in KEY_PROVIDER_KINDS:
        raise AppKeysError(f"unknown key provider: {kind}")
    if not isinstance(fields, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in fields.items()
    ):
        raise AppKeysError(f"key provider {kind} fields must be strings")
    return KeyProvider(kind, dict(fields))
