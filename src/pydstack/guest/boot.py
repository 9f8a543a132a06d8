"""the guest boot flow, the same for every CVM backend (upstream `dstack-util setup`, §6.3).

Stage 0 copies the host share with size caps (no symlinks followed), checks the app-compose
policy, measures the app into RTMR3 (`system-preparing` ... `boot-mr-done`), obtains keys from
the key provider (KMS over RA-TLS, or `none`: ephemeral keys from a random seed), measures
`os-image-hash` (KMS), `key-provider`, `storage-fs` and `system-ready`, and reports the instance
info to the host. Stage 1 decrypts the env, keeping only `allowed_envs`. Progress and errors go
to the host through `notify(event, payload)`; any failure is reported as `boot.error` and raised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydstack.attest.attestation import Attestation, stripped, to_versioned_bytes
from pydstack.attest.report_data import ratls_report_data
from pydstack.crypto.certs import CertRequest, cert_pem, issue_cert, key_pem, spki_der
from pydstack.crypto.envcrypt import decrypt_env, filter_allowed_envs
from pydstack.crypto.kdf import derive_key, derive_p256_key, p256_pkcs8_der
from pydstack.errors import DstackError
from pydstack.types import hostshare as hs
from pydstack.types.app_compose import AppCompose
from pydstack.types.capped import read_capped
from pydstack.types.sysconfig import SysConfig

from .appkeys import AppKeys, KeyProvider
from .instance import InstanceInfo
from .kms_client import get_app_keys
from .measure import AppIdentity, key_provider_info, measure_stage1, measure_stage2

log = logging.getLogger(__name__)
Notify = Callable[[str, str], Awaitable[None]]
Storage = Callable[[bytes], Awaitable[None]]

_SAFE = re.compile(r"^[A-Za-z0-9_./:@%+,=-]*$")


class BootError(DstackError):
    """the CVM cannot boot; the message is what the host shows as boot_error."""


@dataclass
class BootResult:
    keys: AppKeys
    identity: AppIdentity
    envs: list[tuple[str, str]] = field(default_factory=list)
    dropped_envs: list[str] = field(default_factory=list)


def copy_host_share(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    os.chmod(dst, 0o700)
    for shared in hs.SHARED_FILES:
        name, cap, required = shared.name, shared.max_size, shared.required
        try:
            fd = os.open(src / name, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            if required:
                raise BootError(f"host share is missing {name}") from None
            continue
        except OSError as e:
            raise BootError(f"cannot read {name} from the host share: {e.strerror}") from e
        with os.fdopen(fd, "rb") as f:
            data = read_capped(f, cap)
        if len(data) > cap:
            raise BootError(f"{name} exceeds its {cap}-byte limit")
        out = os.open(dst / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(out, "wb") as f:
            f.write(data)


def keys_from_seed(seed: bytes, attestation: Callable[[bytes], bytes]) -> AppKeys:
    """key providers none/local/tpm: keys derived from a 32-byte seed, a self-signed app CA."""
    ca_key = derive_p256_key(seed, [b"app-key"])
    disk_key = derive_p256_key(seed, [b"app-disk-key"])
    ca = issue_cert(
        CertRequest(
            "App Root Cert",
            org_name="Dstack",
            ca_level=1,
            attestation=attestation(spki_der(ca_key.public_key())),
        ),
        ca_key.public_key(),
        ca_key,
    )
    return AppKeys(
        disk_crypt_key=hashlib.sha256(p256_pkcs8_der(disk_key)).digest(),
        env_crypt_key=b"",
        k256_key=derive_key(seed, [b"app-k256-key"]),
        k256_signature=b"",
        gateway_app_id="",
        ca_cert=cert_pem(ca),
        key_provider=KeyProvider("None", {"key": key_pem(ca_key)}),
    )


def env_file_line(key: str, value: str) -> str:
    if _SAFE.match(value):
        return f"{key}={value}"
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("$", "\\$")
        .replace("`", "\\`")
        .replace("\n", "\\n")
    )
    return f'{key}="{escaped}"'


class Booter:
    def __init__(self, platform: object, host_shared: Path, work_dir: Path, notify: Notify) -> None:
        self.platform = platform
        self.host_shared = host_shared
        self.work_dir = work_dir
        self.shared = work_dir / ".host-shared"
        self.notify = notify

    def _attestation(self, spki: bytes, config: str) -> bytes:
        rd = ratls_report_data(spki)
        p = self.platform
        att = Attestation(
            quote=p.get_quote(rd),  # type: ignore[attr-defined]
            event_log=tuple(p.event_log()),  # type: ignore[attr-defined]
            runtime_events=tuple(p.runtime_events()),  # type: ignore[attr-defined]
            report_data=rd,
            config=config,
        )
        return to_versioned_bytes(stripped(att))

    async def run(self, *, storage_fs: str = "none", storage: Storage | None = None) -> BootResult:
        """boot; `storage(disk_crypt_key)` sets up the data disk after the keys are measured."""
        try:
            return await self._run(storage_fs, storage)
        except Exception as e:
            message = str(e) or type(e).__name__
            log.error("boot failed: %s", message)
            await self.notify("boot.error", message)
            if isinstance(e, BootError):
                raise
            raise BootError(message) from e

    async def _run(self, storage_fs: str, storage: Storage | None) -> BootResult:
        copy_host_share(self.host_shared, self.shared)
        compose_raw = (self.shared / hs.APP_COMPOSE).read_bytes()
        compose = AppCompose.parse(compose_raw)
        compose.check_policy()
        sys_config = SysConfig.load(self.shared / hs.SYS_CONFIG)
        info = InstanceInfo.load(self.shared / hs.INSTANCE_INFO)
        provider = compose.key_provider
        if provider not in ("kms", "none"):
            raise BootError(f"key provider {provider!r} is not available on this platform")
        if provider == "none":
            info = InstanceInfo(b"", b"", info.app_id)  # the disk is not reusable: fresh seed
        identity = measure_stage1(
            self.platform,  # type: ignore[arg-type]
            compose_raw,
            info,
            init_scripts=compose.init_scripts,
            no_instance_id=compose.flag("no_instance_id"),
        )
        await self.notify("boot.progress", "requesting app keys")
        config = sys_config.vm_config

        def attest(spki: bytes) -> bytes:
            return self._attestation(spki, config)

        os_image: bytes | None = None
        if provider == "kms":
            if not sys_config.kms_urls:
                raise BootError("the app needs a kms but sys-config lists no kms_urls")
            errors = []
            for url in sys_config.kms_urls:
                try:
                    keys, provider_id = await get_app_keys(url, attest, config)
                    break
                except Exception as e:
                    errors.append(f"{url}: {e}")
            else:
                raise BootError("failed to get app keys: " + "; ".join(errors))
            pin = compose.key_provider_id
            if pin and pin != provider_id:
                raise BootError("the kms is not the key provider this app pinned")
            os_image = sys_config.os_image_hash
        else:
            keys = keys_from_seed(os.urandom(32), attest)
            provider_id = b""
        keys.save(self.shared / hs.APP_KEYS)
        measure_stage2(
            self.platform,  # type: ignore[arg-type]
            key_provider=key_provider_info(provider, provider_id),
            storage_fs=storage_fs,
            os_image_hash=os_image,
        )
        if storage is not None:
            await storage(keys.disk_crypt_key)
        await self.notify("instance.info", identity.instance_info.to_json())
        await self.notify("boot.progress", "data disk ready")
        result = BootResult(keys, identity)
        encrypted = self.shared / hs.ENCRYPTED_ENV
        if keys.env_crypt_key and encrypted.exists() and encrypted.stat().st_size:
            envs = decrypt_env(keys.env_crypt_key, encrypted.read_bytes())
            allowed = compose.allowed_envs
            result.envs, result.dropped_envs = filter_allowed_envs(envs, allowed)
            for name in result.dropped_envs:
                log.warning("env var %s is not in allowed_envs; dropped", name[:64])
        lines = "".join(env_file_line(k, v) + "\n" for k, v in result.envs)
        for name, data in (
            (hs.DECRYPTED_ENV, lines),
            (hs.DECRYPTED_ENV_JSON, json.dumps(dict(result.envs))),
        ):
            fd = os.open(self.shared / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(data)
        return result
