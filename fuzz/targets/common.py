"""what several targets share: the test vectors, a simulated CVM and its evidence, and helpers.

Seeds are built deterministically from fixed seeds: the simulated TD, its mock PKI and the keys
below are derived from constants, so the same inputs come out every time (except ECDSA
signatures, which are randomised; any of them verifies the same).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pydstack.attest.attestation import Attestation, encode_v0, encode_v1, stripped
from pydstack.attest.eventlog import RuntimeEvent
from pydstack.attest.report_data import ratls_report_data
from pydstack.crypto.certs import spki_der
from pydstack.guest.instance import InstanceInfo
from pydstack.guest.measure import key_provider_info, measure_stage1, measure_stage2
from pydstack.tee.mockpki import derive_p256
from pydstack.tee.simulated import SimulatedTdx

REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / "tests" / "vectors"
TD_SEED = hashlib.sha256(b"pydstack fuzz td").digest()
OS_IMAGE = "fuzz-os-image"
COMPOSE = b'{"manifest_version":2,"name":"fuzz","runner":"docker-compose"}'
VM_CONFIG = json.dumps({"os_image_hash": hashlib.sha256(OS_IMAGE.encode()).hexdigest()})
#: the time quotes are verified at (collateral is issued the day before, valid for weeks)
NOW = int(time.time())

T = TypeVar("T")


def vector(path: str) -> bytes:
    return (VECTORS / path).read_bytes()


def text(data: bytes) -> str:
    """the input as text: UTF-8, with invalid bytes kept as lone surrogates (so encoded
    surrogates and undecodable bytes reach parsers that take a str)."""
    return data.decode("utf-8", "surrogateescape")


def refusing(
    allowed: tuple[type[BaseException], ...], fn: Callable[..., T], *args: Any, **kwargs: Any
) -> T | None:
    """`fn(*args, **kwargs)`, or None when it raises one of the `allowed` errors."""
    try:
        return fn(*args, **kwargs)
    except allowed:
        return None


def key(label: str) -> ec.EllipticCurvePrivateKey:
    """a P-256 key derived from `label` (the same one every run)."""
    return derive_p256(TD_SEED, "fuzz-" + label)


@dataclasses.dataclass(frozen=True)
class Cvm:
    tdx: SimulatedTdx
    runtime: tuple[RuntimeEvent, ...]


@cache
def cvm(version: int = 1) -> Cvm:
    """a simulated CVM that measured an app the way the guest does (version 2: JSON events)."""
    tdx = SimulatedTdx(TD_SEED, os_image=OS_IMAGE)
    measure_stage1(
        tdx, COMPOSE, InstanceInfo(b"\x01" * 20), init_scripts=("echo hi",), version=version
    )
    measure_stage2(
        tdx,
        key_provider=key_provider_info("kms", b"\x02" * 32),
        storage_fs="ext4",
        os_image_hash=hashlib.sha256(OS_IMAGE.encode()).digest(),
        version=version,
    )
    return Cvm(tdx, tuple(tdx.runtime_events()))


@cache
def attestation(version: int = 1, *, bound_to: bytes = b"", strip: bool = True) -> Attestation:
    """an attestation of `cvm(version)` over sha512("ratls-cert:" || `bound_to`) when given,
    else over fixed report data."""
    c = cvm(version)
    rd = ratls_report_data(bound_to) if bound_to else hashlib.sha512(b"fuzz").digest()
    att = Attestation(c.tdx.get_quote(rd), tuple(c.tdx.event_log()), c.runtime, rd, VM_CONFIG)
    return stripped(att) if strip else att


def attestation_bytes(version: int = 1, *, bound_to: bytes = b"", v1: bool = False) -> bytes:
    att = attestation(version, bound_to=bound_to)
    return encode_v1(att) if v1 or version == 2 else encode_v0(att)


def quote(report_data: bytes = b"fuzz") -> bytes:
    return cvm().tdx.get_quote(hashlib.sha512(report_data).digest())


def spki(k: ec.EllipticCurvePrivateKey) -> bytes:
    return spki_der(k.public_key())


def legacy_cert(quote_bytes: bytes, event_log: bytes, k: ec.EllipticCurvePrivateKey) -> bytes:
    """a legacy RA-TLS certificate (quote in `.1`, JSON event log in `.2`) as DER."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from pydstack.attest.ratls import OID_EVENT_LOG, OID_TDX_QUOTE, wrap_extension_value

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "legacy")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(k.public_key())
        .serial_number(7)
        .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2100, 1, 1, tzinfo=dt.UTC))
        .add_extension(
            x509.UnrecognizedExtension(OID_TDX_QUOTE, wrap_extension_value(quote_bytes)), False
        )
        .add_extension(
            x509.UnrecognizedExtension(OID_EVENT_LOG, wrap_extension_value(event_log)), False
        )
    )
    return builder.sign(k, hashes.SHA256()).public_bytes(Encoding.DER)
