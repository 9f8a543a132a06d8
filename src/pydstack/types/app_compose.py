"""`app-compose.json`: the app's measured manifest, as the VMM receives it and the guest boots it.

The compose hash is sha256 of the exact bytes (upstream treats the document as opaque bytes: any
byte-level change is another app). The fields read here are upstream's; unknown fields are kept
in `doc` and carried along untouched.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from pydstack.errors import InputError

from . import jsonlimits
from .hostshare import SHARED_FILES

#: manifests this guest understands (upstream: numeric, at most 3)
MAX_MANIFEST_VERSION = 3
RUNNERS = ("docker-compose", "nerdctl-compose", "bash")
KEY_PROVIDERS = ("none", "kms", "local", "tpm")
MAX_APP_COMPOSE = next(f.max_size for f in SHARED_FILES if f.name == "app-compose.json")


class AppComposeError(InputError):
    """an app-compose document is malformed or asks for what no guest may do."""


@dataclass(frozen=True)
class AppCompose:
    raw: bytes
    doc: dict[str, Any]

    @classmethod
    def parse(cls, raw: bytes | str, *, max_bytes: int = MAX_APP_COMPOSE) -> AppCompose:
        """a JSON object of at most `max_bytes`, in UTF-8 (within `jsonlimits`' bounds);
        AppComposeError otherwise, and from the accessors and `check_policy` for fields of the
        wrong type. Linear time."""
        if isinstance(raw, str):
            try:
                raw = raw.encode("utf-8")
            except UnicodeEncodeError:
                raise AppComposeError("app compose contains a lone surrogate") from None
        doc = jsonlimits.load_object(raw, "app compose", max_bytes=max_bytes, error=AppComposeError)
        return cls(raw, doc)

    @property
    def compose_hash(self) -> bytes:
        return hashlib.sha256(self.raw).digest()

    @property
    def name(self) -> str:
        value = self.doc.get("name", "")
        return value if isinstance(value, str) else ""

    @property
    def runner(self) -> str:
        value = self.doc.get("runner", "docker-compose")
        return value if isinstance(value, str) else ""

    @property
    def docker_compose_file(self) -> str:
        value = self.doc.get("docker_compose_file", "")
        if not isinstance(value, str):
            raise AppComposeError("docker_compose_file must be a string")
        return value

    @property
    def key_provider(self) -> str:
        """`key_provider`, else upstream's legacy flags (`kms_enabled`,
        `local_key_provider_enabled`), else "none"."""
        kp = self.doc.get("key_provider")
        if isinstance(kp, str) and kp:
            return kp
        if self.doc.get("kms_enabled"):
            return "kms"
        if self.doc.get("local_key_provider_enabled"):
            return "local"
        return "none"

    @property
    def key_provider_id(self) -> bytes:
        """the pinned key provider (hex in the document, as upstream parses it); b"" when none.
        AppComposeError when it is not hex."""
        value = self.doc.get("key_provider_id", "")
        if value in ("", None):
            return b""
        if not isinstance(value, str):
            raise AppComposeError("key_provider_id must be a hex string")
        try:
            return bytes.fromhex(value.removeprefix("0x"))
        except ValueError:
            raise AppComposeError("key_provider_id must be hex") from None

    @property
    def allowed_envs(self) -> list[str]:
        value = self.doc.get("allowed_envs") or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise AppComposeError("allowed_envs must be a list of strings")
        return list(value)

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.doc.get(name, default)
        return value if isinstance(value, bool) else default

    @property
    def init_scripts(self) -> tuple[str, ...]:
        scripts = self.doc.get("init_script")
        if scripts is None:
            return ()
        if isinstance(scripts, str):
            return (scripts,)
        if isinstance(scripts, list) and all(isinstance(s, str) for s in scripts):
            return tuple(scripts)
        raise AppComposeError("init_script must be a string or a list of strings")

    def check_policy(self) -> None:
        """upstream's manifest checks: a known manifest_version (at most 3), a name, a known
        runner, and the features that need manifest_version 3."""
        mv = self.doc.get("manifest_version")
        try:
            version = int(str(mv))
        except ValueError:
            raise AppComposeError(f"invalid manifest_version {str(mv)[:32]!r}") from None
        if version < 1 or version > MAX_MANIFEST_VERSION:
            raise AppComposeError(
                f"unsupported manifest_version {version} (max {MAX_MANIFEST_VERSION})"
            )
        if not isinstance(self.doc.get("name"), str):
            raise AppComposeError("app-compose has no name")
        runner = self.doc.get("runner")
        if runner not in RUNNERS:
            raise AppComposeError(f"unsupported runner {str(runner)[:32]!r}")
        if (runner == "nerdctl-compose" or "requirements" in self.doc) and version < 3:
            raise AppComposeError("this app-compose needs manifest_version 3")
        scripts = self.init_scripts
        if len(scripts) > 5 or (len(scripts) > 1 and version < 3):
            raise AppComposeError("more than one init script needs manifest_version 3 (at most 5)")
        self.key_provider_id  # noqa: B018 - refuses a pin that is not hex
