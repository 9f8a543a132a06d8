"""targets of `pydstack.attest`: quotes, event logs, versioned attestations, RA-TLS certificates,
app info and identity."""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import json
from collections.abc import Callable, Sequence
from functools import cache

from fuzz import mutators as m
from fuzz.harness import Target
from fuzz.targets import common as c
from pydstack.attest.attestation import decode_versioned
from pydstack.attest.errors import AttestError, ParseError, VerifyError
from pydstack.attest.eventlog import (
    RuntimeEvent,
    event_log_from_json,
    event_log_to_json,
    parse_ccel,
    replay_rtmrs,
    strip_event_log,
)
from pydstack.attest.identity import AppInfo, os_image_hash_from_config
from pydstack.attest.quote import parse_quote
from pydstack.attest.ratls import (
    GZIP_MAGIC,
    cert_attestation,
    compress_ext_value,
    parse_ratls_cert,
    verify_cert_binding,
)
from pydstack.attest.verify import precheck_quote, verify_quote
from pydstack.crypto.certload import load_cert_der
from pydstack.crypto.certs import CertRequest, issue_cert
from pydstack.mr.machine import VmMeasureConfig
from pydstack.tee.collateral import make_collateral
from pydstack.types.sysconfig import SysConfig

# -- quote ---------------------------------------------------------------------------------


def _quote_seeds() -> list[tuple[str, bytes]]:
    return [
        ("tdx-v4", c.vector("dcap-qvl/tdx_quote")),
        ("tdx-v5", c.vector("dcap-qvl/tdx_quote_outdated")),
        ("sgx-v3", c.vector("dcap-qvl/sgx_quote")),
        ("tappd", bytes.fromhex(c.vector("dcap-qvl/quote-from-tappd.hex").decode().strip())),
        ("ra-tls", c.vector("dstack/ra-tls_tdx_quote")),
        ("simulated", c.quote()),
    ]


def _parse_quote(data: bytes) -> None:
    q = parse_quote(data)
    assert len(q.signed_bytes) == q.signed_length <= len(data)
    _ = q.report_data, q.is_tdx


QUOTE_TOKENS = (
    b"\x04\x00\x02\x00\x81\x00\x00\x00",
    b"\x05\x00\x02\x00\x81\x00\x00\x00",
    b"\x03\x00\x02\x00\x00\x00\x00\x00",
    b"\x02\x00\x48\x02\x00\x00",
    b"\x03\x00\x88\x02\x00\x00",
    b"\x06\x00",
    b"\x05\x00",
    b"-----BEGIN CERTIFICATE-----\n",
    b"-----END CERTIFICATE-----\n",
)

QUOTE = Target(
    name="quote",
    doc="`attest/quote.py::parse_quote`: DCAP quotes v3 (SGX), v4 and v5 (TD report 1.0/1.5)",
    make=lambda: _parse_quote,
    allowed=(ParseError,),
    seeds=_quote_seeds,
    mutators=(*m.BINARY, m.length_inflate, m.length_shrink),
    tokens=QUOTE_TOKENS,
    max_len=66 * 1024,
)


@cache
def _collateral() -> str:
    issue = dt.datetime.fromtimestamp(c.NOW - 86400, dt.UTC)
    return make_collateral(c.cvm().tdx.pki, issue=issue).to_qvl_json()  # valid for weeks


def _make_verify() -> Callable[[bytes], object]:
    root = c.cvm().tdx.pki.root_ca_der
    collateral = _collateral()

    def call(data: bytes) -> None:
        c.refusing((VerifyError,), precheck_quote, data, root, now=c.NOW)
        verify_quote(data, collateral, root_ca_der=root, now=c.NOW)

    return call


QUOTE_VERIFY = Target(
    name="quote_verify",
    doc="`attest/verify.py`: `precheck_quote` (PCK chain, QE report and quote signatures) and "
    "`verify_quote` (dcap-qvl under the policy) of simulated quotes under their mock root",
    make=_make_verify,
    allowed=(VerifyError,),
    seeds=lambda: [("simulated", c.quote()), ("simulated-2", c.quote(b"other"))],
    mutators=(*m.BINARY, m.length_inflate, m.length_shrink),
    tokens=QUOTE_TOKENS,
    max_len=12 * 1024,
    calls=2,
)

# -- event logs ----------------------------------------------------------------------------


def _ccel(data: bytes) -> None:
    events = parse_ccel(data)
    replay_rtmrs(events)


def _ccel_seeds() -> list[tuple[str, bytes]]:
    full = c.vector("dstack/ccel.bin")
    end = full.rstrip(b"\xff")
    return [("vector", end + b"\xff" * 8), ("vector-full", full), ("header-only", end[:65])]


CCEL = Target(
    name="ccel",
    doc="`attest/eventlog.py::parse_ccel` and `replay_rtmrs`: the TCG crypto-agile boot log",
    make=lambda: _ccel,
    allowed=(ParseError,),
    seeds=_ccel_seeds,
    mutators=(*m.BINARY, m.length_inflate, m.length_shrink),
    tokens=(
        b"Spec ID Event03\x00",
        b"\xff\xff\xff\xff",
        b"\x0c\x00",
        b"\x0c\x000\x00",
        b"\x03\x00\x00\x00",
    ),
    max_len=68 * 1024,
)


def _event_log_json(data: bytes) -> None:
    for doc in (data, c.text(data)):
        events = c.refusing((ParseError,), event_log_from_json, doc)
        if events is None:
            continue
        replay_rtmrs(events)
        strip_event_log(events)
        again = event_log_from_json(event_log_to_json(events))
        assert again == events, "a parsed event log does not survive its own json form"


def _event_log_seeds() -> list[tuple[str, bytes]]:
    report = json.loads(c.vector("dstack/verifier_quote-report.json"))
    getquote = json.loads(c.vector("dstack/verifier_tdx-lite-getquote.json"))
    out = []
    for label, doc in (("report", report), ("getquote", getquote)):
        log = doc.get("event_log") or doc.get("quote", {}).get("event_log")
        if isinstance(log, str):
            out.append((label, log.encode()))
        elif isinstance(log, list):
            out.append((label, json.dumps(log).encode()))
    for version in (1, 2):
        out.append(
            (f"simulated-v{version}", event_log_to_json(c.cvm(version).tdx.event_log()).encode())
        )
    return out


EVENT_FIELDS = (
    *(b'"imr"', b'"event_type"', b'"digest"', b'"event"', b'"event_payload"'),
    *(b'"version"', b'"preimage"', b'"payload"', b"134217729", b'"0x'),
)

EVENT_LOG_JSON = Target(
    name="eventlog_json",
    doc="`attest/eventlog.py::event_log_from_json` (bytes and str) with replay, stripping and "
    "a round trip through `event_log_to_json`",
    make=lambda: _event_log_json,
    allowed=(),
    seeds=_event_log_seeds,
    mutators=m.JSON,
    tokens=EVENT_FIELDS,
    max_len=64 * 1024,
    calls=4,
)


def _runtime_line(data: bytes) -> None:
    ev = RuntimeEvent.from_log_line(c.text(data))
    ev.digest()
    again = RuntimeEvent.from_log_line(ev.to_log_line())
    assert again == ev, "a runtime event does not survive its own log line"


RUNTIME_EVENT_LINE = Target(
    name="runtime_event_line",
    doc="`attest/eventlog.py::RuntimeEvent.from_log_line` with digest and round trip",
    make=lambda: _runtime_line,
    allowed=(ParseError,),
    seeds=lambda: [
        (f"v{v}-{i}", ev.to_log_line().encode())
        for v in (1, 2)
        for i, ev in enumerate(c.cvm(v).runtime)
    ],
    mutators=m.JSON,
    tokens=(b'"event"', b'"payload"', b'"version"', b"==", b"\\/"),
    max_len=8 * 1024,
    calls=2,
)

# -- versioned attestations and identity ---------------------------------------------------


def _attestation(data: bytes) -> None:
    att = decode_versioned(data)
    replay_rtmrs(att.event_log)
    for boottime in (False, True):
        c.refusing((ParseError,), AppInfo.from_attestation, att, boottime_mr=boottime)


def _attestation_seeds() -> list[tuple[str, bytes]]:
    lite = json.loads(c.vector("dstack/verifier_tdx-lite-attestation.json"))
    return [
        ("simulator-v0", c.vector("dstack/simulator_attestation.bin")),
        ("lite-v0", bytes.fromhex(lite["attestation"])),
        ("simulated-v0", c.attestation_bytes(1)),
        ("simulated-v1", c.attestation_bytes(1, v1=True)),
        ("simulated-v1-json-events", c.attestation_bytes(2)),
    ]


ATTESTATION = Target(
    name="attestation",
    doc="`attest/attestation.py::decode_versioned` (V0 SCALE, V1 msgpack), then "
    "`attest/identity.py::AppInfo.from_attestation` (both RTMR3 variants)",
    make=lambda: _attestation,
    allowed=(ParseError,),
    seeds=_attestation_seeds,
    mutators=(*m.SCALE, m.msgpack_length, m.msgpack_length),
    tokens=(
        b"version",
        b"platform",
        b"kind",
        b"tdx",
        b"stack",
        b"dstack",
        b"data",
        b"quote",
        b"event_log",
        b"runtime_events",
        b"report_data",
        b"config",
        b"preimage",
    ),
    max_len=24 * 1024,
    calls=3,
)


def _app_info(data: bytes) -> None:
    info = AppInfo.from_msgpack(data)
    assert AppInfo.from_msgpack(info.to_msgpack()) == info, "app info does not round-trip"


def _app_info_seeds() -> list[tuple[str, bytes]]:
    out = []
    for v in (1, 2):
        info = AppInfo.from_attestation(c.attestation(v), boottime_mr=False, ppid=b"\x01" * 16)
        out.append((f"v{v}", info.to_msgpack()))
    return out


APP_INFO = Target(
    name="app_info",
    doc="`attest/identity.py::AppInfo.from_msgpack` (the RA-TLS app-info extension)",
    make=lambda: _app_info,
    allowed=(ParseError,),
    seeds=_app_info_seeds,
    mutators=m.MSGPACK,
    max_len=4 * 1024,
    calls=2,
)


def _vm_config(data: bytes) -> None:
    for doc in (c.text(data), data.decode("utf-8", "replace")):
        os_image_hash_from_config(doc)
        sc = SysConfig(vm_config=doc)
        _ = sc.vm_config_obj, sc.os_image_hash
        # what the KMS and the verifier measure a CVM's image by: ParseError or a config
        if sc.vm_config_obj is not None:
            with contextlib.suppress(ParseError):
                VmMeasureConfig.from_obj(sc.vm_config_obj)


VM_CONFIG = Target(
    name="vm_config",
    doc="`attest/identity.py::os_image_hash_from_config` and `types/sysconfig.py` "
    "`SysConfig.vm_config_obj`/`os_image_hash`: a vm_config string (or a sys-config nesting "
    "one), which never raise; and `mr/machine.py::VmMeasureConfig.from_obj` of it (`ParseError`)",
    make=lambda: _vm_config,
    allowed=(),
    seeds=lambda: [
        ("vm-config", c.VM_CONFIG.encode()),
        ("nested", json.dumps({"vm_config": c.VM_CONFIG}).encode()),
        ("nested-object", json.dumps({"vm_config": json.loads(c.VM_CONFIG)}).encode()),
        (
            "lite",
            json.loads(c.vector("dstack/verifier_tdx-lite-getquote.json"))["vm_config"].encode(),
        ),
    ],
    mutators=m.JSON,
    tokens=(b'"os_image_hash"', b'"vm_config"', b'"0x', b'"qemu_version"', b'"8.2.2"', b"\xc2\xb2"),
    max_len=8 * 1024,
    calls=4,
)

# -- RA-TLS certificates ---------------------------------------------------------------------


def _ratls(data: bytes) -> None:
    try:
        cert = load_cert_der(data)  # as servers and verifiers load what peers send
    except ValueError:
        return  # not a certificate cryptography reads: no peer gets this far
    c.refusing((AttestError,), parse_ratls_cert, cert)
    c.refusing((AttestError,), cert_attestation, cert)
    verify_cert_binding(cert)


def _ratls_seeds() -> list[tuple[str, bytes]]:
    from cryptography.hazmat.primitives.serialization import Encoding

    k = c.key("ratls")
    spki = c.spki(k)
    info = AppInfo.from_attestation(c.attestation(1), boottime_mr=False).to_msgpack()
    out = []
    for label, att in (
        ("v0", c.attestation_bytes(1, bound_to=spki)),
        ("v1", c.attestation_bytes(2, bound_to=spki)),
    ):
        req = CertRequest(
            "app.example",
            org_name="fuzz",
            alt_names=("app.example", "127.0.0.1"),
            usage_server_auth=True,
            app_id=b"\x03" * 20,
            special_usage="app:custom",
            attestation=att,
            app_info=info,
        )
        cert = issue_cert(req, k.public_key(), k)
        out.append((label, cert.public_bytes(Encoding.DER)))
    legacy = c.attestation(1, bound_to=spki, strip=False)
    log = event_log_to_json(legacy.event_log).encode()
    out.append(("legacy", c.legacy_cert(legacy.quote, log, k)))
    out.append(("legacy-gzip", c.legacy_cert(legacy.quote, compress_ext_value(log), k)))
    return out


def _oid_token(arc: int) -> bytes:
    """the DER of OID 1.3.6.1.4.1.62397.1.`arc`."""
    return bytes.fromhex("060a2b0601040183e73d01") + bytes([arc])


RATLS_CERT = Target(
    name="ratls_cert",
    doc="`attest/ratls.py`: `parse_ratls_cert`, `cert_attestation` and `verify_cert_binding` "
    "of certificates loaded from DER (custom extensions .1 .2 .3 .4 .8 .9, gzip event logs)",
    make=lambda: _ratls,
    allowed=(AttestError,),
    seeds=_ratls_seeds,
    mutators=(*m.DER, m.compact_length),
    tokens=(*tuple(_oid_token(a) for a in (1, 2, 3, 4, 8, 9)), GZIP_MAGIC, gzip.compress(b"[]")),
    max_len=32 * 1024,
    calls=3,
)

TARGETS: Sequence[Target] = (
    QUOTE,
    QUOTE_VERIFY,
    CCEL,
    EVENT_LOG_JSON,
    RUNTIME_EVENT_LINE,
    ATTESTATION,
    APP_INFO,
    VM_CONFIG,
    RATLS_CERT,
)
