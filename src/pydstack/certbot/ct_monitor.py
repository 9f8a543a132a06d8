"""``dstack-ct-monitor``: flags certificates for a gateway's domain whose key it did not attest.

Each round (every ``--interval`` seconds, or once with ``--once``):

1. the gateway's attested key history is fetched (:mod:`.acme_info`) and each key's evidence
   verified (results kept per key and evidence, so a key is verified once);
2. the RFC 6962 log's ``get-sth`` is read and, given the log's key, its signature checked; a
   tree smaller than the one already read is an error;
3. the new entries are read with ``get-entries`` in batches (at most ``--batch`` each, the answer
   bounded), every leaf hashed into a :class:`~.ctlog.CompactMerkleTree` kept from the log's
   start, and the root compared with the tree head's: entries that do not add up to the signed
   root are an error and nothing is taken from them;
4. every x509 or precert entry with a name at or under the base domain (SAN DNS names and the
   CN; ``*.`` wildcards count) is checked: a public key outside the verified history is a
   finding — after the history is fetched once more (a certificate may be logged before the
   gateway stored its attestation).

Findings go to the log, to ``--alert-command`` (run by ``/bin/sh -c`` with the finding as JSON
on stdin, one run per finding) and, with ``--once``, to the exit status: 0 clean, 1 findings,
2 when the round could not be completed. ``--state FILE`` keeps the position and the compact
tree between runs (without it every start reads the log from its first entry).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from pydstack.errors import DstackError
from pydstack.types import jsonlimits

from .acme_info import (
    CachingKeyVerifier,
    KeyVerifier,
    LocalKeyVerifier,
    RemoteKeyVerifier,
    acme_info_url,
    fetch_acme_info,
    parse_acme_info,
    verified_keys,
)
from .ctlog import (
    CompactMerkleTree,
    CtError,
    LogEntry,
    SignedTreeHead,
    leaf_hash,
    load_log_key,
    parse_entries,
    parse_leaf,
    parse_sth,
    verify_sth,
)
from .errors import CertbotError
from .model import normalize_domain

log = logging.getLogger(__name__)

DEFAULT_BATCH = 256
MAX_BATCH = 1000
MAX_RESPONSE = 64 << 20
ALERT_TIMEOUT = 60.0
EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


@dataclass(frozen=True)
class Finding:
    """a logged certificate for the domain whose key the gateway did not attest."""

    index: int
    entry_type: str
    timestamp: int
    names: list[str]
    public_key_sha256: str
    issuer: str
    serial: str
    not_before: str
    not_after: str

    def to_json(self) -> dict[str, Any]:
        return {
            "alert": "certificate issued to an unattested public key",
            "index": self.index,
            "entry_type": self.entry_type,
            "timestamp": self.timestamp,
            "names": self.names,
            "public_key_sha256": self.public_key_sha256,
            "issuer": self.issuer,
            "serial": self.serial,
            "not_before": self.not_before,
            "not_after": self.not_after,
        }


def cert_names(cert: x509.Certificate) -> list[str]:
    """the SAN DNS names and the subject CNs, lower-case, without a trailing dot."""
    names: list[str] = []
    with contextlib.suppress(x509.ExtensionNotFound, ValueError):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names.extend(san.get_values_for_type(x509.DNSName))
    with contextlib.suppress(ValueError):
        for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            if isinstance(attr.value, str):
                names.append(attr.value)
    return sorted({n.strip().rstrip(".").lower() for n in names if n})


def under(name: str, base: str) -> bool:
    """`name` (a ``*.`` wildcard counts as its base) is `base` or below it."""
    n = name.removeprefix("*.")
    return n == base or n.endswith("." + base)


def spki_of(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _finding(index: int, entry: LogEntry, cert: x509.Certificate, names: list[str]) -> Finding:
    return Finding(
        index=index,
        entry_type=entry.kind,
        timestamp=entry.timestamp,
        names=names,
        public_key_sha256=hashlib.sha256(spki_of(cert)).hexdigest(),
        issuer=cert.issuer.rfc4514_string()[:512],
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc.isoformat(),
        not_after=cert.not_valid_after_utc.isoformat(),
    )


class CtMonitor:
    """one log, one base domain, one gateway's history."""

    def __init__(
        self,
        log_url: str,
        base_domain: str,
        acme_info: str,
        verifier: KeyVerifier,
        *,
        client: httpx.AsyncClient,
        log_key: Any = None,
        batch: int = DEFAULT_BATCH,
        state_path: Path | None = None,
    ) -> None:
        self.log_url = log_url.rstrip("/")
        self.base = normalize_domain(base_domain)
        self.acme_info = acme_info
        self.verifier = CachingKeyVerifier(verifier)
        self.client = client
        self.log_key = log_key
        self.batch = max(1, min(batch, MAX_BATCH))
        self.state_path = state_path
        self.tree = CompactMerkleTree()
        self.sth: SignedTreeHead | None = None
        if state_path is not None and state_path.exists():
            self._load_state(state_path)

    # -------------------------------------------------------------------------- state

    def _load_state(self, path: Path) -> None:
        try:
            obj = jsonlimits.loads(path.read_bytes(), max_bytes=1 << 20)
            if not isinstance(obj, dict) or obj.get("log_url") != self.log_url:
                raise CtError("state file is for another log")
            self.tree = CompactMerkleTree.from_json(obj.get("tree"))
        except (OSError, ValueError) as e:
            raise CertbotError(f"state file {path} is unusable: {e}") from e

    def _save_state(self) -> None:
        if self.state_path is None:
            return
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps({"log_url": self.log_url, "tree": self.tree.to_json()}))
        os.replace(tmp, self.state_path)

    # -------------------------------------------------------------------------- known keys

    async def known_keys(self) -> set[bytes]:
        """the verified public keys of the gateway's history (CertbotError as
        :func:`~.acme_info.verified_keys`)."""
        keys = parse_acme_info(await fetch_acme_info(self.client, self.acme_info))
        return await verified_keys(keys, self.verifier)

    # -------------------------------------------------------------------------- the log

    async def _get(self, path: str, params: dict[str, int] | None = None) -> Any:
        url = f"{self.log_url}/ct/v1/{path}"
        try:
            resp = await self.client.get(url, params=params)
        except httpx.HTTPError as e:
            raise CertbotError(f"ct log {path}: {type(e).__name__}: {e}") from e
        if not resp.is_success:
            raise CertbotError(f"ct log {path}: http {resp.status_code}")
        if len(resp.content) > MAX_RESPONSE:
            raise CtError(f"ct log {path} answer is larger than {MAX_RESPONSE} bytes")
        try:
            return jsonlimits.loads(resp.content, max_bytes=MAX_RESPONSE, max_items=4 * MAX_BATCH)
        except ValueError as e:
            raise CtError(f"ct log {path} answer is not json: {e}") from e

    async def read_log(self) -> list[tuple[int, LogEntry]]:
        """the entries added since the last round, verified against the signed tree head (the
        position only moves once they are)."""
        sth = parse_sth(await self._get("get-sth"))
        if self.log_key is not None:
            verify_sth(sth, self.log_key)
        if sth.tree_size < self.tree.size:
            raise CtError(f"ct log shrank from {self.tree.size} to {sth.tree_size} entries")
        tree = self.tree.copy()
        out: list[tuple[int, LogEntry]] = []
        while tree.size < sth.tree_size:
            start = tree.size
            end = min(start + self.batch, sth.tree_size) - 1
            leaves = parse_entries(
                await self._get("get-entries", {"start": start, "end": end}), end - start + 1
            )
            for leaf in leaves:
                index = tree.size
                tree.append(leaf_hash(leaf))
                try:
                    out.append((index, parse_leaf(leaf)))
                except CtError as e:
                    log.warning("ct entry %d skipped: %s", index, e)
        if tree.root() != sth.root_hash:
            raise CtError(f"ct log entries do not match the signed tree head at {sth.tree_size}")
        self.tree, self.sth = tree, sth
        return out

    async def poll_once(self) -> list[Finding]:
        """one round; the findings (CertbotError/CtError when it could not be completed)."""
        known = await self.known_keys()
        suspects: list[tuple[Finding, bytes]] = []
        for index, entry in await self.read_log():
            try:
                cert = entry.certificate()
            except CtError as e:
                log.warning("ct entry %d skipped: %s", index, e)
                continue
            names = cert_names(cert)
            if not any(under(n, self.base) for n in names):
                continue
            spki = spki_of(cert)
            if spki not in known:
                suspects.append((_finding(index, entry, cert, names), spki))
        if suspects:
            known = await self.known_keys()
        findings = [f for f, spki in suspects if spki not in known]
        self._save_state()
        return findings


async def alert(command: str | None, finding: Finding) -> None:
    """logs `finding` and runs `command` with it as JSON on stdin (failures are logged)."""
    body = json.dumps(finding.to_json())
    log.error("certificate issued to an unattested public key: %s", body)
    if not command:
        return
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", command, stdin=asyncio.subprocess.PIPE
    )
    try:
        await asyncio.wait_for(proc.communicate(body.encode()), ALERT_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log.error("alert command timed out")
        return
    if proc.returncode != 0:
        log.error("alert command exited with %s", proc.returncode)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dstack-ct-monitor",
        description="flag certificates for a gateway's domain whose key the gateway did not attest",
    )
    ap.add_argument("--log-url", required=True, help="the RFC 6962 log's base url")
    ap.add_argument("--log-key", type=Path, help="the log's public key (PEM): check tree heads")
    ap.add_argument("--domain", required=True, help="the base domain to watch")
    ap.add_argument(
        "-g",
        "--gateway",
        default=os.environ.get("GATEWAY"),
        help="base_domain[:port] (acme info at https://gateway.<base>/.dstack/acme-info) or the "
        "url of /.dstack/acme-info or of the gateway's /prpc/AcmeInfo",
    )
    ap.add_argument(
        "-v", "--verifier-url", default=os.environ.get("VERIFIER_URL"), help="dstack-verifier url"
    )
    ap.add_argument(
        "--verifier-config",
        type=Path,
        help="a dstack-verifier config (TOML): verify in process instead of through a url",
    )
    ap.add_argument("--ca-cert", type=Path, help="roots for the gateway's and the log's TLS")
    ap.add_argument("--once", action="store_true", help="one round; exit 1 on findings")
    ap.add_argument("--interval", type=float, default=60.0)
    ap.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    ap.add_argument("--state", type=Path, help="keep the position in this file")
    ap.add_argument("--alert-command", help="run with each finding as JSON on stdin")
    return ap


def _verifier(args: argparse.Namespace, client: httpx.AsyncClient) -> KeyVerifier:
    if args.verifier_config is not None:
        from pydstack.verifier.config import VerifierConfig
        from pydstack.verifier.service import build_verifier

        return LocalKeyVerifier(build_verifier(VerifierConfig.load(args.verifier_config)))
    if args.verifier_url:
        return RemoteKeyVerifier(client, args.verifier_url)
    raise CertbotError("give --verifier-url or --verifier-config")


async def run(args: argparse.Namespace) -> int:
    verify: ssl.SSLContext | bool = True
    if args.ca_cert is not None:
        verify = ssl.create_default_context(cafile=str(args.ca_cert))
    if not args.gateway:
        raise CertbotError("give --gateway (or GATEWAY)")
    log_key = load_log_key(args.log_key.read_bytes()) if args.log_key is not None else None
    async with httpx.AsyncClient(verify=verify, timeout=30.0) as client:
        monitor = CtMonitor(
            args.log_url,
            args.domain,
            acme_info_url(args.gateway),
            _verifier(args, client),
            client=client,
            log_key=log_key,
            batch=args.batch,
            state_path=args.state,
        )
        if args.once:
            findings = await monitor.poll_once()
            for f in findings:
                await alert(args.alert_command, f)
            log.info("checked %d log entries", monitor.tree.size)
            return EXIT_FINDINGS if findings else EXIT_CLEAN
        from pydstack.process import stop_signal

        stop = stop_signal()
        while not stop.is_set():
            try:
                for f in await monitor.poll_once():
                    await alert(args.alert_command, f)
            except DstackError as e:
                log.error("ct monitor round failed: %s", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.interval)
        return EXIT_CLEAN


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return asyncio.run(run(args))
    except DstackError as e:
        log.error("ct monitor: %s", e)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
