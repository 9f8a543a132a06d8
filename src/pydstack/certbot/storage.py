"""where the certbot keeps its records: :class:`CertStorage`, over any key-value space.

:class:`KvCertStorage` lays the records out under upstream's keys (``global/acme_credentials``,
``global/acme_attestation``, ``global/certbot_config``, ``dns_cred/<id>``, ``dns_cred_default``,
``cert/<domain>/config``, ``cert/<domain>/data``, ``cert/<domain>/attestation/<ts>``) as JSON
text, on a :class:`KeyValue` — four methods the gateway's store (a local file, or etcd under a
prefix) implements. :class:`MemoryKv` and :class:`FileKv` are the in-process and single-file
ones.

A record that does not decode is a :class:`CertbotInputError` naming its key (the caller refuses
to act on it rather than overwrite it). Listing is bounded (:data:`MAX_LIST`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydstack.types.jsonlimits import load_object

from .errors import CertbotInputError
from .model import (
    AcmeAttestation,
    AcmeCredentials,
    CertAttestation,
    CertbotSettings,
    CertData,
    DnsCredential,
    ZtDomainConfig,
    normalize_domain,
)

T = TypeVar("T")

#: the most keys a listing returns
MAX_LIST = 100_000
#: the most bytes of a file store
MAX_FILE_BYTES = 256 << 20

ACME_CREDENTIALS = "global/acme_credentials"
ACME_ATTESTATION = "global/acme_attestation"
CERTBOT_CONFIG = "global/certbot_config"
DNS_CRED = "dns_cred/"
DNS_CRED_DEFAULT = "dns_cred_default"
CERT = "cert/"


class KeyValue(Protocol):
    """a flat space of text values under string keys (last writer wins)."""

    async def get(self, key: str) -> str | None: ...

    async def put(self, key: str, value: str) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def list_prefix(self, prefix: str) -> dict[str, str]:
        """every key starting with `prefix` and its value."""
        ...


class CertStorage(Protocol):
    """the certbot's records; see :class:`KvCertStorage` for the contract of each method."""

    async def get_acme_credentials(self) -> AcmeCredentials | None: ...
    async def put_acme_credentials(self, creds: AcmeCredentials) -> None: ...
    async def get_acme_attestation(self) -> AcmeAttestation | None: ...
    async def put_acme_attestation(self, att: AcmeAttestation) -> None: ...
    async def get_settings(self) -> CertbotSettings: ...
    async def put_settings(self, settings: CertbotSettings) -> None: ...
    async def list_dns_credentials(self) -> list[DnsCredential]: ...
    async def get_dns_credential(self, cred_id: str) -> DnsCredential | None: ...
    async def put_dns_credential(self, cred: DnsCredential) -> None: ...
    async def delete_dns_credential(self, cred_id: str) -> None: ...
    async def get_default_dns_credential(self) -> str | None: ...
    async def set_default_dns_credential(self, cred_id: str | None) -> None: ...
    async def list_zt_domains(self) -> list[ZtDomainConfig]: ...
    async def get_zt_domain(self, domain: str) -> ZtDomainConfig | None: ...
    async def put_zt_domain(self, config: ZtDomainConfig) -> None: ...
    async def delete_zt_domain(self, domain: str) -> None: ...
    async def get_cert(self, domain: str) -> CertData | None: ...
    async def put_cert(self, domain: str, data: CertData) -> None: ...
    async def list_cert_domains(self) -> list[str]: ...
    async def add_cert_attestation(self, domain: str, att: CertAttestation) -> None: ...
    async def list_cert_attestations(
        self, domain: str, limit: int | None = None
    ) -> list[CertAttestation]: ...


def _decode(key: str, text: str, parse: Callable[[dict[str, Any]], T]) -> T:
    try:
        return parse(load_object(text, key, max_bytes=64 << 20, error=CertbotInputError))
    except CertbotInputError as e:
        raise CertbotInputError(f"stored {key} is corrupt: {e}") from e


def _dump(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


def _cert_key(domain: str, part: str) -> str:
    return f"{CERT}{normalize_domain(domain)}/{part}"


class KvCertStorage:
    """:class:`CertStorage` on a :class:`KeyValue` with upstream's key layout."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def _get(self, key: str, parse: Callable[[dict[str, Any]], T]) -> T | None:
        text = await self.kv.get(key)
        return None if text is None else _decode(key, text, parse)

    async def _list(self, prefix: str, parse: Callable[[dict[str, Any]], T]) -> list[tuple[str, T]]:
        items = await self.kv.list_prefix(prefix)
        if len(items) > MAX_LIST:
            raise CertbotInputError(f"more than {MAX_LIST} keys under {prefix}")
        return [(k, _decode(k, v, parse)) for k, v in sorted(items.items())]

    # the account
    async def get_acme_credentials(self) -> AcmeCredentials | None:
        """None when no account was made; CertbotInputError for a corrupt record."""
        return await self._get(ACME_CREDENTIALS, AcmeCredentials.from_json)

    async def put_acme_credentials(self, creds: AcmeCredentials) -> None:
        await self.kv.put(ACME_CREDENTIALS, _dump(creds.to_json()))

    async def get_acme_attestation(self) -> AcmeAttestation | None:
        return await self._get(ACME_ATTESTATION, AcmeAttestation.from_json)

    async def put_acme_attestation(self, att: AcmeAttestation) -> None:
        await self.kv.put(ACME_ATTESTATION, _dump(att.to_json()))

    # settings
    async def get_settings(self) -> CertbotSettings:
        """the stored settings, or the defaults when none were set."""
        got = await self._get(CERTBOT_CONFIG, CertbotSettings.from_json)
        return got if got is not None else CertbotSettings()

    async def put_settings(self, settings: CertbotSettings) -> None:
        await self.kv.put(CERTBOT_CONFIG, _dump(settings.to_json()))

    # dns credentials
    async def list_dns_credentials(self) -> list[DnsCredential]:
        return [c for _, c in await self._list(DNS_CRED, DnsCredential.from_json)]

    async def get_dns_credential(self, cred_id: str) -> DnsCredential | None:
        return await self._get(DNS_CRED + cred_id, DnsCredential.from_json)

    async def put_dns_credential(self, cred: DnsCredential) -> None:
        await self.kv.put(DNS_CRED + cred.id, _dump(cred.to_json()))

    async def delete_dns_credential(self, cred_id: str) -> None:
        await self.kv.delete(DNS_CRED + cred_id)

    async def get_default_dns_credential(self) -> str | None:
        return await self.kv.get(DNS_CRED_DEFAULT) or None

    async def set_default_dns_credential(self, cred_id: str | None) -> None:
        if cred_id is None:
            await self.kv.delete(DNS_CRED_DEFAULT)
        else:
            await self.kv.put(DNS_CRED_DEFAULT, cred_id)

    # zt-domains
    async def list_zt_domains(self) -> list[ZtDomainConfig]:
        items = await self.kv.list_prefix(CERT)
        keys = sorted(k for k in items if k.endswith("/config") and k.count("/") == 2)
        if len(keys) > MAX_LIST:
            raise CertbotInputError(f"more than {MAX_LIST} zt-domains")
        return [_decode(k, items[k], ZtDomainConfig.from_json) for k in keys]

    async def get_zt_domain(self, domain: str) -> ZtDomainConfig | None:
        return await self._get(_cert_key(domain, "config"), ZtDomainConfig.from_json)

    async def put_zt_domain(self, config: ZtDomainConfig) -> None:
        await self.kv.put(_cert_key(config.domain, "config"), _dump(config.to_json()))

    async def delete_zt_domain(self, domain: str) -> None:
        """drops the config only: the certificate and its attestations stay (as upstream)."""
        await self.kv.delete(_cert_key(domain, "config"))

    # certificates
    async def get_cert(self, domain: str) -> CertData | None:
        return await self._get(_cert_key(domain, "data"), CertData.from_json)

    async def put_cert(self, domain: str, data: CertData) -> None:
        await self.kv.put(_cert_key(domain, "data"), _dump(data.to_json()))

    async def list_cert_domains(self) -> list[str]:
        """every domain with a stored certificate (its config may have been deleted)."""
        keys = await self.kv.list_prefix(CERT)
        return sorted(k[len(CERT) : -len("/data")] for k in keys if k.endswith("/data"))

    async def add_cert_attestation(self, domain: str, att: CertAttestation) -> None:
        """keeps `att` in the history (keyed by its time in microseconds) and as the latest."""
        text = _dump(att.to_json())
        stamp = f"{round(att.generated_at * 1_000_000):020d}"
        await self.kv.put(_cert_key(domain, f"attestation/{stamp}"), text)
        await self.kv.put(_cert_key(domain, "attestation/latest"), text)

    async def list_cert_attestations(
        self, domain: str, limit: int | None = None
    ) -> list[CertAttestation]:
        """the history, newest first (at most `limit`)."""
        prefix = _cert_key(domain, "attestation/")
        items = [
            (k, a)
            for k, a in await self._list(prefix, CertAttestation.from_json)
            if not k.endswith("/latest")
        ]
        items.reverse()
        out = [a for _, a in items]
        return out if limit is None else out[: max(limit, 0)]


class MemoryKv:
    """:class:`KeyValue` in a dict (one process)."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    async def get(self, key: str) -> str | None:
        return self.data.get(key)

    async def put(self, key: str, value: str) -> None:
        self.data[key] = value

    async def delete(self, key: str) -> None:
        self.data.pop(key, None)

    async def list_prefix(self, prefix: str) -> dict[str, str]:
        return {k: v for k, v in self.data.items() if k.startswith(prefix)}


class FileKv:
    """:class:`KeyValue` in one JSON file (mode 0600), shared by processes on one machine.

    Every operation holds an exclusive ``flock`` on ``<path>.lock``; a write replaces the file
    atomically (a crash leaves the old or the new content). A file that does not parse is a
    CertbotInputError naming it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> dict[str, str]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        obj = load_object(data, str(self.path), max_bytes=MAX_FILE_BYTES, error=CertbotInputError)
        if not all(isinstance(v, str) for v in obj.values()):
            raise CertbotInputError(f"{self.path} holds a value that is not a string")
        return obj

    def _write(self, data: dict[str, str]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _update(self, fn: Callable[[dict[str, str]], None]) -> None:
        with self._locked():
            data = self._read()
            fn(data)
            self._write(data)

    def _snapshot(self) -> dict[str, str]:
        with self._locked():
            return self._read()

    async def get(self, key: str) -> str | None:
        return (await asyncio.to_thread(self._snapshot)).get(key)

    async def put(self, key: str, value: str) -> None:
        await asyncio.to_thread(self._update, lambda d: d.__setitem__(key, value))

    async def delete(self, key: str) -> None:
        def drop(d: dict[str, str]) -> None:
            d.pop(key, None)

        await asyncio.to_thread(self._update, drop)

    async def list_prefix(self, prefix: str) -> dict[str, str]:
        data = await asyncio.to_thread(self._snapshot)
        return {k: v for k, v in data.items() if k.startswith(prefix)}
