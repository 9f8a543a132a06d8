"""`dstack-verifier.toml`: upstream's keys, and a few of this implementation's.

Upstream's: `address` (README: `host`, accepted too; default 0.0.0.0), `port` (8080),
`image_cache_dir`, `image_download_url` (must contain `{OS_IMAGE_HASH}`; empty disables
downloads), `image_download_timeout_secs` (300), `[attestation]
insecure_allow_external_trust_anchors`, `[attestation.urls] pccs`, `[attestation.root_ca] tdx`
(a DER or PEM root certificate; refused unless the insecure flag is true).

This implementation's: `[attestation] collateral_files` (QuoteCollateralV3 JSON files, e.g.
saved from a PCCS, for offline use), `[attestation] cache_dir` (collateral kept on disk),
`[attestation] max_concurrent_fetches` (4), `allowed_hosts` / `allowed_origins` (as every
server's request guard), `[server_limits]` (connection cap and timeouts) and `workers` (1; the
number of processes serving the port, 0 for one per CPU: a verification holds its process's
interpreter, so more cores need more processes).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from pydstack.crypto.certload import load_cert_der, load_cert_pem
from pydstack.errors import ConfigError
from pydstack.rpc.guard import RequestGuard
from pydstack.rpc.limits import ServerLimits

DEFAULT_DOWNLOAD_URL = "https://download.dstack.org/os-images/mr_{OS_IMAGE_HASH}.tar.gz"
DEFAULT_PCCS = "https://pccs.phala.network"


@dataclass(frozen=True)
class VerifierConfig:
    address: str = "0.0.0.0"
    port: int = 8080
    image_cache_dir: Path = Path("/tmp/dstack-verifier/cache")
    image_download_url: str = DEFAULT_DOWNLOAD_URL
    image_download_timeout: float = 300.0
    pccs_url: str = DEFAULT_PCCS
    root_ca_tdx: Path | None = None
    insecure_allow_external_trust_anchors: bool = False
    collateral_files: tuple[Path, ...] = ()
    collateral_cache_dir: Path | None = None
    max_concurrent_fetches: int = 4
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    server_limits: ServerLimits = field(default_factory=ServerLimits)
    workers: int = 1

    @classmethod
    def load(cls, path: Path) -> VerifierConfig:
        try:
            return cls.from_toml(path.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from e

    @classmethod
    def from_toml(cls, text: str) -> VerifierConfig:
        """ConfigError naming the first bad key."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"invalid verifier config: {e}") from e

        def tbl(obj: Any, *keys: str) -> dict[str, Any]:
            for k in keys:
                obj = obj.get(k, {}) if isinstance(obj, dict) else {}
            if not isinstance(obj, dict):
                raise ConfigError(f"[{'.'.join(keys)}] must be a table")
            return obj

        att = tbl(doc, "attestation")
        base = cls()
        root = tbl(att, "root_ca").get("tdx")
        files = att.get("collateral_files", [])
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ConfigError("attestation.collateral_files must be a list of paths")
        try:
            guard = RequestGuard.from_config(doc.get("allowed_hosts"), doc.get("allowed_origins"))
            limits = ServerLimits.from_table(tbl(doc, "server_limits"), where="server_limits")
            cfg = cls(
                address=str(doc.get("address", doc.get("host", base.address))),
                port=int(doc.get("port", base.port)),
                image_cache_dir=Path(doc.get("image_cache_dir", base.image_cache_dir)),
                image_download_url=str(doc.get("image_download_url", base.image_download_url)),
                image_download_timeout=float(
                    doc.get("image_download_timeout_secs", base.image_download_timeout)
                ),
                pccs_url=str(tbl(att, "urls").get("pccs", base.pccs_url)),
                root_ca_tdx=Path(root) if root else None,
                insecure_allow_external_trust_anchors=bool(
                    att.get("insecure_allow_external_trust_anchors", False)
                ),
                collateral_files=tuple(Path(f) for f in files),
                collateral_cache_dir=Path(att["cache_dir"]) if att.get("cache_dir") else None,
                max_concurrent_fetches=int(att.get("max_concurrent_fetches", 4)),
                allowed_hosts=tuple(sorted(guard.allowed_hosts)),
                allowed_origins=tuple(doc.get("allowed_origins") or ()),
                server_limits=limits,
                workers=_workers(doc.get("workers", 1)),
            )
        except (ValueError, TypeError) as e:
            raise ConfigError(f"invalid verifier config: {e}") from e
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("port must be between 0 and 65535")
        if self.image_download_url and "{OS_IMAGE_HASH}" not in self.image_download_url:
            raise ConfigError("image_download_url must contain {OS_IMAGE_HASH}")
        if not 0 < self.image_download_timeout <= 86400:
            raise ConfigError("image_download_timeout_secs must be between 0 and 86400")
        if self.root_ca_tdx is not None and not self.insecure_allow_external_trust_anchors:
            raise ConfigError(
                "attestation.root_ca.tdx needs attestation.insecure_allow_external_trust_anchors"
                " = true"
            )
        if not 0 <= self.workers <= 256:
            raise ConfigError("workers must be between 0 (one per cpu) and 256")
        if not 1 <= self.max_concurrent_fetches <= 64:
            raise ConfigError("attestation.max_concurrent_fetches must be between 1 and 64")

    @property
    def processes(self) -> int:
        """how many processes serve the port (`workers`, 0 meaning one per CPU)."""
        return self.workers or (os.cpu_count() or 1)

    def guard(self) -> RequestGuard:
        return RequestGuard.from_config(list(self.allowed_hosts), list(self.allowed_origins))

    def root_ca_der(self) -> bytes | None:
        """the configured root as DER (read from a DER or PEM file); ConfigError if unusable."""
        if self.root_ca_tdx is None:
            return None
        try:
            data = self.root_ca_tdx.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read {self.root_ca_tdx}: {e.strerror}") from e
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                return load_cert_pem(data).public_bytes(Encoding.DER)
            load_cert_der(data)
        except ValueError as e:
            raise ConfigError(f"{self.root_ca_tdx} is not a certificate: {e}") from e
        return data


def _workers(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError("workers must be an integer (0 for one per cpu)")
    return value
