"""the guest agent's logic, independent of the RPC layer.

Every method here is what one upstream RPC does (see `reference/upstream-guest-agent.md` §2):
GetKey's HKDF and two-entry signature chain, GetTlsKey's fresh P-256 key per call, GetQuote's
zero padding, Info's values read from the RTMR3 events, Sign/Verify, the legacy Tappd
derivations and the external Worker's GetAttestationForAppKey.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.attest.attestation import Attestation, V1Encoder, to_versioned_bytes
from pydstack.attest.eventlog import (
    RuntimeEvent,
    TdxEvent,
    event_log_to_json,
    strip_event_log,
)
from pydstack.attest.identity import AppInfo
from pydstack.attest.quote import parse_quote
from pydstack.attest.report_data import to_report_data
from pydstack.crypto import ed25519 as ed
from pydstack.crypto import k256
from pydstack.crypto.certs import CertRequest, key_pem
from pydstack.crypto.kdf import derive_key, p256_key_from_bytes
from pydstack.errors import DstackError
from pydstack.types.sysconfig import SysConfig

from .appkeys import AppKeys

log = logging.getLogger(__name__)

EMPTY_SHA256 = hashlib.sha256(b"").digest()
SUPPORTED_KEY_ALGORITHMS = ("secp256k1", "ed25519")
GPU_ATTESTATION_OUTPUT = Path("/run/nvidia-gpu-attestation/attestation.out")
DMI_DIR = Path("/sys/class/dmi/id")
#: distinct GetKey results kept per boot (an app asks for a handful of paths)
KEY_CACHE_SIZE = 4096


class AgentError(DstackError):
    """an expected request error, reported to the caller with this exact message."""


class QuotePlatform(Protocol):
    """what the agent needs from a TDX backend (simulated or real)."""

    #: True for the simulator (full event log and an attestation in GetQuote)
    simulated: bool
    #: True when quotes are signed in this process (see :class:`pydstack.tee.base.TdxPlatform`)
    in_process: bool

    def get_quote(self, report_data: bytes) -> bytes: ...

    def event_log(self) -> list[TdxEvent]: ...

    def runtime_events(self) -> list[RuntimeEvent]: ...


class CertSigner(Protocol):
    """signs a certificate for a fresh key: locally with the app CA, or through the KMS."""

    def sign(self, req: CertRequest, key: ec.EllipticCurvePrivateKey) -> list[str]:
        """the chain as PEM strings, leaf first (`key` signs the KMS's CSR)."""
        ...


def pad64(data: bytes) -> bytes:
    if len(data) > 64:
        raise AgentError("Report data is too long")
    return data.ljust(64, b"\0")


def normalize_algorithm(algorithm: str) -> str:
    """upstream's accepted names: "" and "k256" are secp256k1."""
    if algorithm in ("", "k256", "secp256k1"):
        return "secp256k1"
    if algorithm == "ed25519":
        return "ed25519"
    raise AgentError("Unsupported algorithm")


class QuoteResult(NamedTuple):
    quote: bytes
    event_log: str
    report_data: bytes
    vm_config: str
    attestation: bytes = b""
    #: the hex of `quote` and `attestation` where the encoder made them (kept parts), else empty
    quote_hex: bytes = b""
    attestation_hex: bytes = b""


@dataclass(frozen=True)
class _Evidence:
    """what quotes carry besides the quote, for one set of runtime events."""

    runtime_events: tuple[RuntimeEvent, ...]
    event_log: tuple[TdxEvent, ...]
    #: GetQuote's event log JSON (stripped as upstream's on real TDX)
    quote_event_log: str
    v1: V1Encoder


@dataclass(frozen=True)
class InfoResult:
    app_id: bytes
    instance_id: bytes
    app_cert: str
    tcb_info: str
    app_name: str
    device_id: bytes
    mr_aggregated: bytes
    os_image_hash: bytes
    key_provider_info: str
    compose_hash: bytes
    vm_config: str
    cloud_vendor: str
    cloud_product: str


@dataclass
class GuestCore:
    """one app's agent state: its keys, compose file, sys-config and TDX backend."""

    platform: QuotePlatform
    keys: AppKeys
    compose_raw: bytes
    sys_config: SysConfig
    signer: CertSigner
    dmi_dir: Path = DMI_DIR
    gpu_attestation_file: Path = GPU_ATTESTATION_OUTPUT
    _demo_cert: str = ""
    _demo_lock: threading.Lock = field(default_factory=threading.Lock)
    #: GetKey results of this boot (the app's keys cannot change within one), bounded
    _keys: OrderedDict[tuple[str, str, str], tuple[bytes, list[bytes]]] = field(
        default_factory=OrderedDict
    )
    _keys_lock: threading.Lock = field(default_factory=threading.Lock)
    #: Info of this boot per `external`, with the runtime-event count it was taken at
    _info: dict[bool, tuple[int, InfoResult]] = field(default_factory=dict)
    #: the event log and its encodings, for the runtime events they were taken with
    _evidence: _Evidence | None = None

    # ------------------------------------------------------------------ compose
    @property
    def app_compose(self) -> dict[str, object]:
        try:
            obj = json.loads(self.compose_raw)
        except ValueError:
            return {}
        return obj if isinstance(obj, dict) else {}

    @property
    def app_name(self) -> str:
        name = self.app_compose.get("name", "")
        return name if isinstance(name, str) else ""

    def compose_flag(self, name: str, default: bool) -> bool:
        value = self.app_compose.get(name, default)
        return value if isinstance(value, bool) else default

    # ------------------------------------------------------------------ keys
    def get_key(self, path: str, purpose: str, algorithm: str) -> tuple[bytes, list[bytes]]:
        """the key for (path, purpose, algorithm) and its signature chain, computed once per
        boot and served from memory afterwards (at most KEY_CACHE_SIZE of them)."""
        hit = self.cached_key(path, purpose, algorithm)
        if hit is not None:
            return hit
        alg = normalize_algorithm(algorithm)
        key, chain = k256.get_key_chain(
            self.keys.k256_key, path, purpose, alg, self.keys.k256_signature
        )
        with self._keys_lock:
            self._keys[(path, purpose, algorithm)] = (key, chain)
            while len(self._keys) > KEY_CACHE_SIZE:
                self._keys.popitem(last=False)
        return key, list(chain)

    def cached_key(
        self, path: str, purpose: str, algorithm: str
    ) -> tuple[bytes, list[bytes]] | None:
        """GetKey's answer when this boot computed it already (no crypto, no thread)."""
        with self._keys_lock:
            hit = self._keys.get((path, purpose, algorithm))
            if hit is None:
                return None
            self._keys.move_to_end((path, purpose, algorithm))
        return hit[0], list(hit[1])

    def get_tls_key(
        self,
        subject: str,
        alt_names: Sequence[str],
        *,
        usage_ra_tls: bool,
        usage_server_auth: bool,
        usage_client_auth: bool,
        not_before: int | None = None,
        not_after: int | None = None,
        with_app_info: bool = False,
        seed: bytes | None = None,
    ) -> tuple[str, list[str]]:
        if not_before is not None and not_after is not None and not_before >= not_after:
            raise AgentError("not_before must be earlier than not_after")
        secret = derive_key(seed if seed is not None else os.urandom(32), [b""], 32)
        key = p256_key_from_bytes(secret)
        req = CertRequest(
            subject=subject,
            alt_names=tuple(alt_names),
            usage_server_auth=usage_server_auth,
            usage_client_auth=usage_client_auth,
            not_before=not_before,
            not_after=not_after,
            attestation=self.certificate_attestation(key.public_key()) if usage_ra_tls else None,
            app_info=self.app_info(boottime_mr=False).to_msgpack() if with_app_info else None,
        )
        return key_pem(key), self.signer.sign(req, key)

    def derive_tappd_key(
        self,
        path: str,
        subject: str,
        alt_names: Sequence[str],
        *,
        usage_ra_tls: bool,
        usage_server_auth: bool,
        usage_client_auth: bool,
        random_seed: bool,
    ) -> tuple[str, list[str]]:
        """legacy Tappd.DeriveKey: a P-256 key deterministic per path (unless random_seed)."""
        ikm = os.urandom(32) if random_seed else self.keys.k256_key
        secret = derive_key(ikm, [path.encode()], 32)
        key = p256_key_from_bytes(secret)
        req = CertRequest(
            subject=subject,
            alt_names=tuple(alt_names),
            usage_server_auth=usage_server_auth,
            usage_client_auth=usage_client_auth,
            attestation=self.certificate_attestation(key.public_key()) if usage_ra_tls else None,
        )
        return key_pem(key), self.signer.sign(req, key)

    # ------------------------------------------------------------------ quotes
    def _current_evidence(self) -> _Evidence:
        """the event log as of now; rebuilt only when the runtime events changed."""
        runtime = tuple(self.platform.runtime_events())
        evidence = self._evidence
        if evidence is None or evidence.runtime_events != runtime:
            events = tuple(self.platform.event_log())
            shown = list(events) if self.platform.simulated else strip_event_log(events)
            evidence = _Evidence(
                runtime_events=runtime,
                event_log=events,
                quote_event_log=event_log_to_json(shown),
                v1=V1Encoder(events, runtime, self.sys_config.vm_config),
            )
            self._evidence = evidence
        return evidence

    def attestation(self, report_data: bytes) -> Attestation:
        rd = pad64(report_data)
        evidence = self._current_evidence()
        quote = self.platform.get_quote(rd)
        return Attestation(
            quote=quote,
            event_log=evidence.event_log,
            runtime_events=evidence.runtime_events,
            report_data=rd,
            config=self.sys_config.vm_config,
        )

    def certificate_attestation(self, public_key: ec.EllipticCurvePublicKey) -> bytes:
        """the stripped, versioned attestation bound to a certificate key (RA-TLS)."""

        spki = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return self.spki_attestation(spki)

    def spki_attestation(self, spki: bytes) -> bytes:
        """the stripped, versioned attestation bound to a key given as SPKI DER."""
        from pydstack.attest.attestation import stripped

        att = self.attestation(hashlib.sha512(b"ratls-cert:" + spki).digest())
        return to_versioned_bytes(stripped(att))

    def get_quote(self, report_data: bytes) -> QuoteResult:
        rd = pad64(report_data)
        evidence = self._current_evidence()
        quote = self.platform.get_quote(rd)
        if not self.platform.simulated:  # real TDX: no attestation, as upstream's
            return QuoteResult(quote, evidence.quote_event_log, rd, self.sys_config.vm_config)
        # the simulator adds upstream's v1 attestation
        v1 = evidence.v1.encode_hex(quote, rd)
        return QuoteResult(
            quote=quote,
            event_log=evidence.quote_event_log,
            report_data=rd,
            vm_config=self.sys_config.vm_config,
            attestation=v1.attestation,
            quote_hex=v1.quote_hex,
            attestation_hex=v1.attestation_hex,
        )

    def attest(self, report_data: bytes) -> bytes:
        return to_versioned_bytes(self.attestation(report_data))

    def tdx_quote(
        self, report_data: bytes, hash_algorithm: str, prefix: str
    ) -> tuple[QuoteResult, str, str]:
        """legacy Tappd.TdxQuote: report_data = H(prefix ":" data), or raw 64 bytes."""
        alg = hash_algorithm or "sha512"
        tag = "" if alg == "raw" else (prefix or "app-data")
        try:
            rd = to_report_data(tag, report_data, alg)
        except ValueError as e:
            raise AgentError(str(e)) from e
        return self.get_quote(rd), alg, tag

    def get_attestation_for_app_key(self, algorithm: str) -> QuoteResult:
        if algorithm not in SUPPORTED_KEY_ALGORITHMS:
            raise AgentError("Unsupported algorithm")
        key, _ = self.get_key("vms", "signing", algorithm)
        if algorithm == "ed25519":
            pub = ed.public_key(key)
            text = "dip1::ed25519-pk:" + _b64url(pub)
        else:
            pub = k256.compressed_pubkey(key)
            text = "dip1::secp256k1c-pk:" + _b64url(pub)
        return self.get_quote(text.encode())

    # ------------------------------------------------------------------ sign / verify
    def sign(self, algorithm: str, data: bytes) -> tuple[bytes, list[bytes], bytes]:
        prehashed = algorithm == "secp256k1_prehashed"
        base = "secp256k1" if prehashed else normalize_algorithm(algorithm)
        key, _ = self.get_key("vms", "signing", base)
        if base == "ed25519":
            signature = ed.sign(key, data)
            public_key = ed.public_key(key)
        else:
            if prehashed and len(data) != 32:
                raise AgentError(
                    f"Pre-hashed signing requires a 32-byte digest, but received {len(data)} bytes"
                )
            signature = k256.sign_ecdsa(key, data, prehashed=prehashed)
            public_key = k256.compressed_pubkey(key)
        app_sig = k256.sign_recoverable(
            self.keys.k256_key, k256.keccak256(f"signing:{public_key.hex()}".encode())
        )
        return signature, [signature, app_sig, self.keys.k256_signature], public_key

    def verify(self, algorithm: str, data: bytes, signature: bytes, public_key: bytes) -> bool:
        prehashed = algorithm == "secp256k1_prehashed"
        base = "secp256k1" if prehashed else normalize_algorithm(algorithm)
        try:
            if base == "ed25519":
                return ed.verify(public_key, data, signature)
            return k256.verify_ecdsa(public_key, data, signature, prehashed=prehashed)
        except ValueError as e:
            raise AgentError(str(e)) from e

    # ------------------------------------------------------------------ info
    def _first_event(self, name: str) -> bytes:
        for ev in self.platform.runtime_events():
            if ev.event == "system-ready":
                break
            if ev.event == name:
                return ev.payload
        return b""

    def app_info(self, *, boottime_mr: bool) -> AppInfo:
        att = self.attestation(b"")
        return AppInfo.from_attestation(att, boottime_mr=boottime_mr, ppid=None)

    def demo_cert(self) -> str:
        """the client-auth RA-TLS "demo-cert" chain shown by Info (issued once)."""
        with self._demo_lock:
            if not self._demo_cert:
                try:
                    _, chain = self.get_tls_key(
                        "demo-cert",
                        (),
                        usage_ra_tls=True,
                        usage_server_auth=False,
                        usage_client_auth=True,
                    )
                    self._demo_cert = "\n".join(chain)
                except Exception as e:  # issuing may need the KMS; Info still answers
                    log.warning("cannot issue the demo certificate yet: %s", e)
            return self._demo_cert

    def cached_info(self, *, external: bool) -> InfoResult | None:
        """Info as last computed, while no runtime event was measured since."""
        hit = self._info.get(external)
        if hit is not None and hit[0] == len(self.platform.runtime_events()):
            return hit[1]
        return None

    def info(self, *, external: bool) -> InfoResult:
        """what Info answers; constant within a boot once its events are measured, so it is
        computed once (a quote and the event log) and served from memory until RTMR3 moves."""
        hit = self.cached_info(external=external)
        if hit is not None:
            return hit
        generation = len(self.platform.runtime_events())
        result = self._compute_info(external=external)
        if result.app_cert:  # the demo cert may need the kms: not cached until it exists
            self._info[external] = (generation, result)
        return result

    def _compute_info(self, *, external: bool) -> InfoResult:
        att = self.attestation(b"")
        quote = parse_quote(att.quote)
        report = quote.td_report
        app = AppInfo.from_attestation(att, boottime_mr=False, ppid=None)
        show_tcb = not external or self.compose_flag("public_tcbinfo", True)
        tcb_info = ""
        if show_tcb:
            mrs: dict[str, object] = {}
            if report is not None:
                mrs = {
                    "mrtd": report.mr_td.hex(),
                    "rtmr0": report.rtmr0.hex(),
                    "rtmr1": report.rtmr1.hex(),
                    "rtmr2": report.rtmr2.hex(),
                    "rtmr3": report.rtmr3.hex(),
                }
            tcb = {
                **mrs,
                "mr_aggregated": app.mr_aggregated.hex(),
                "os_image_hash": self.sys_config.os_image_hash.hex(),
                "compose_hash": self._first_event("compose-hash").hex(),
                "device_id": EMPTY_SHA256.hex(),
                "event_log": [e.to_json_obj() for e in att.event_log],
                "app_compose": self.compose_raw.decode("utf-8", "replace"),
            }
            tcb_info = json.dumps(tcb, indent=2)
        return InfoResult(
            app_id=self._first_event("app-id"),
            instance_id=self._first_event("instance-id"),
            app_cert=self.demo_cert(),
            tcb_info=tcb_info,
            app_name=self.app_name,
            device_id=EMPTY_SHA256,
            mr_aggregated=app.mr_aggregated,
            os_image_hash=self.sys_config.os_image_hash,
            key_provider_info=self._first_event("key-provider").decode("utf-8", "replace"),
            compose_hash=self._first_event("compose-hash"),
            vm_config=self.sys_config.vm_config if show_tcb else "",
            cloud_vendor=_read_dmi(self.dmi_dir / "sys_vendor"),
            cloud_product=_read_dmi(self.dmi_dir / "product_name"),
        )

    def gpu_info(self) -> str:
        try:
            return self.gpu_attestation_file.read_text()[: 16 * 1024 * 1024]
        except OSError:
            return ""

    def uptime(self) -> float:
        return time.monotonic()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _read_dmi(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""
