"""the one verification path: from a CVM's evidence to what it is and what it runs.

The KMS, the verifier service and the CLI all call :meth:`EvidenceVerifier.verify`. It runs
three checks and reports each on its own:

* **quote** — the quote's own signatures and PCK chain under the configured root (Intel's, or a
  mock root only when one was configured), then dcap-qvl with collateral from the
  :class:`CollateralCache` (a PCCS, its cache, or collateral loaded from a file). The TCB status
  and advisories are surfaced, not gated (dcap-qvl refuses revoked platforms; debug TDs and a
  non-zero MR_SIGNER_SEAM are always refused);
* **event log** — the quote's report_data equals the attestation's, RTMR3 equals the replay of
  the runtime events (version-2 preimages must be the canonical ones), and the identity
  measured in RTMR3 has its exact lengths (app id 20 bytes, hashes 32);
* **os image** — an :class:`OsImageChecker` (dstack-mr, :mod:`pydstack.mr.verify`) recomputes
  MRTD and RTMR0-2 for the image the vm_config names and compares them with the quote's.

A failed check does not stop the others (unless `fail_fast`, which the KMS uses): a quote whose
collateral cannot be had still gets its event log and OS image checked, and the result says
which passed. `is_valid` is true only when all three did.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydstack.types import jsonlimits

from .attestation import (
    MAX_ATTESTATION_SIZE,
    Attestation,
    decode_versioned,
    from_quote_and_event_log,
)
from .bootinfo import BootInfo
from .errors import ParseError, VerifyError
from .eventlog import MAX_EVENT_LOG_JSON, TdxEvent, event_log_from_json, replay_runtime_events
from .identity import AppInfo
from .quote import MAX_QUOTE_LEN, Quote, TdReport, parse_quote
from .verify import CollateralCache, VerificationPolicy, verify_quote

TEE_VARIANT_TDX = "dstack-tdx"
MAX_VM_CONFIG = 1024 * 1024
#: every TCB status a verifier surfaces instead of refusing (the caller's policy decides)
SURFACED_TCB_STATUSES = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
    }
)
QUOTE, EVENT_LOG, OS_IMAGE = "quote", "event log", "os image"


@dataclass(frozen=True)
class TdRegisters:
    """the build-time registers the OS image must explain."""

    mrtd: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes


@dataclass(frozen=True)
class OsImageResult:
    acpi_tables_verified: bool = False
    is_dev: bool | None = None
    version: str | None = None


class OsImageChecker(Protocol):
    async def check_os_image(
        self, vm_config: dict[str, Any], registers: TdRegisters, event_log: Sequence[TdxEvent]
    ) -> OsImageResult:
        """the image the vm_config names explains `registers`; VerifyError or ParseError saying
        which register does not match, or why it cannot be checked."""
        ...


def load_vm_config(config: str) -> dict[str, Any]:
    """a vm_config object from its JSON, or from a sys-config carrying it in `vm_config`;
    ParseError when it is neither."""
    try:
        obj = jsonlimits.loads(config, max_bytes=MAX_VM_CONFIG) if config else {}
        if isinstance(obj, dict) and "os_image_hash" not in obj and "vm_config" in obj:
            nested = obj["vm_config"]
            obj = (
                jsonlimits.loads(nested, max_bytes=MAX_VM_CONFIG)
                if isinstance(nested, str)
                else nested
            )
    except ValueError as e:
        raise ParseError(f"vm_config is not valid json: {e}") from e
    if not isinstance(obj, dict):
        raise ParseError("vm_config must be a json object")
    return obj


def _image_hash(vm: dict[str, Any] | None) -> bytes:
    value = vm.get("os_image_hash", "") if vm is not None else ""
    try:
        return bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        return b""


# ---------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Evidence:
    """what to verify: an attestation, and the vm_config given beside it (raw form only)."""

    attestation: Attestation
    vm_config: str = ""
    #: the parse of `attestation.quote`, when decoding the request made one
    quote: Quote | None = None


def _unhex(value: Any, what: str, limit: int) -> bytes:
    if not isinstance(value, str):
        raise ParseError(f"{what} must be a hex string")
    if len(value) > 2 * limit:
        raise ParseError(f"{what} is larger than {limit} bytes")
    try:
        return binascii.unhexlify(value)
    except (binascii.Error, ValueError) as e:
        raise ParseError(f"{what} is not valid hex (no 0x prefix)") from e


def evidence_from_request(body: Any) -> Evidence:
    """upstream's verifier request: `{"attestation": hex}` (top-level quote, event_log and
    vm_config are then ignored) or `{"quote": hex, "event_log": json string, "vm_config": json
    string}` (a GetQuote response can be posted as is). ParseError naming what is wrong."""
    if not isinstance(body, dict):
        raise ParseError("request must be a json object")
    if body.get("attestation") is not None:
        raw = _unhex(body["attestation"], "attestation", MAX_ATTESTATION_SIZE)
        return Evidence(decode_versioned(raw))
    if body.get("quote") is None:
        raise ParseError("request needs attestation, or quote with event_log and vm_config")
    quote = _unhex(body["quote"], "quote", MAX_QUOTE_LEN)
    event_log = body.get("event_log")
    if not isinstance(event_log, str):
        raise ParseError("event_log must be the event log's json text")
    if len(event_log) > MAX_EVENT_LOG_JSON:
        raise ParseError("event_log is too large")
    vm_config = body.get("vm_config", "")
    if not isinstance(vm_config, str):
        raise ParseError("vm_config must be the vm config's json text")
    if len(vm_config) > MAX_VM_CONFIG:
        raise ParseError(f"vm_config is larger than {MAX_VM_CONFIG} bytes")
    events = event_log_from_json(event_log)
    parsed = parse_quote(quote)
    return Evidence(from_quote_and_event_log(quote, events, vm_config, parsed), vm_config, parsed)


# ---------------------------------------------------------------------------------- results


_json_str = json.encoder.encode_basestring_ascii


def _js(value: str | None) -> str:
    """a JSON string (or null) exactly as json.dumps writes it."""
    return "null" if value is None else _json_str(value)


def _jb(value: bool | None) -> str:
    return "null" if value is None else "true" if value else "false"


def _jlist(values: Sequence[str]) -> str:
    return "[" + ", ".join(_json_str(x) for x in values) + "]"


def key_provider_of(info: bytes) -> dict[str, str] | None:
    """the decoded key-provider event (`{"name", "id"}`), None when absent or malformed."""
    try:
        obj = jsonlimits.loads(info) if info else None
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    name, kid = obj.get("name"), obj.get("id")
    if not isinstance(name, str) or not isinstance(kid, str):
        return None
    return {"name": name, "id": kid}


@dataclass
class Verification:
    """the outcome of each check; `failures` holds (check, reason) in the order found."""

    image_required: bool = True
    quote_verified: bool = False
    event_log_verified: bool = False
    os_image_hash_verified: bool = False
    acpi_tables_verified: bool = False
    os_image_is_dev: bool | None = None
    os_image_version: str | None = None
    tee_variant: str | None = None
    report_data: bytes | None = None
    tcb_status: str | None = None
    advisory_ids: tuple[str, ...] = ()
    report: TdReport | None = None
    app_info: AppInfo | None = None
    os_image_hash: bytes = b""
    failures: list[tuple[str, str]] = field(default_factory=list)

    def fail(self, check: str, reason: str) -> None:
        self.failures.append((check, reason))

    @property
    def is_valid(self) -> bool:
        image_ok = self.os_image_hash_verified or not self.image_required
        return not self.failures and self.quote_verified and self.event_log_verified and image_ok

    @property
    def reason(self) -> str | None:
        if not self.failures:
            return None
        return "; ".join(f"{check}: {why}" for check, why in self.failures)

    @property
    def boot_info(self) -> BootInfo | None:
        """the authorization payload (only for an event log that verified)."""
        app = self.app_info
        if app is None:
            return None
        return BootInfo(
            tee_variant=TEE_VARIANT_TDX,
            mr_aggregated=app.mr_aggregated,
            os_image_hash=self.os_image_hash,
            mr_system=app.mr_system,
            app_id=app.app_id,
            compose_hash=app.compose_hash,
            instance_id=app.instance_id,
            device_id=app.device_id,
            key_provider_info=app.key_provider_info,
            tcb_status=self.tcb_status or "",
            advisory_ids=self.advisory_ids,
        )

    def to_json_obj(self) -> dict[str, Any]:
        """upstream's `/verify` response: `{is_valid, details, reason}`."""
        details: dict[str, Any] = {
            "quote_verified": self.quote_verified,
            "event_log_verified": self.event_log_verified,
            "os_image_hash_verified": self.os_image_hash_verified,
            "acpi_tables_verified": self.acpi_tables_verified,
            "os_image_is_dev": self.os_image_is_dev,
            "os_image_version": self.os_image_version,
            "tee_variant": self.tee_variant,
            "report_data": None if self.report_data is None else self.report_data.hex(),
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "key_provider": None,
            "app_info": None,
        }
        app, report = self.app_info, self.report
        if app is not None and report is not None:
            details["key_provider"] = key_provider_of(app.key_provider_info)
            details["app_info"] = {
                "app_id": app.app_id.hex(),
                "compose_hash": app.compose_hash.hex(),
                "instance_id": app.instance_id.hex(),
                "device_id": app.device_id.hex(),
                "mrtd": report.mr_td.hex(),
                "rtmr0": report.rtmr0.hex(),
                "rtmr1": report.rtmr1.hex(),
                "rtmr2": report.rtmr2.hex(),
                "rtmr3": report.rtmr3.hex(),
                "mr_system": app.mr_system.hex(),
                "mr_aggregated": app.mr_aggregated.hex(),
                "os_image_hash": self.os_image_hash.hex(),
                "key_provider_info": app.key_provider_info.hex(),
                "init_script_hashes": None
                if app.init_script_hashes is None
                else [h.hex() for h in app.init_script_hashes],
            }
        boot = self.boot_info
        if self.is_valid and boot is not None:
            details["boot_info"] = boot.to_json_obj()
        return {"is_valid": self.is_valid, "details": details, "reason": self.reason}

    def to_json_bytes(self) -> bytes:
        """`json.dumps(self.to_json_obj()).encode()`, byte for byte, written directly: the
        `/verify` answer without building its dicts, each hex field formatted once (hex needs
        no escaping; every other string is escaped as json.dumps escapes it)."""
        valid = self.is_valid
        app, report = self.app_info, self.report
        key_provider = app_info = "null"
        boot_info = ""
        if app is not None:
            app_id, compose, instance = (
                app.app_id.hex(),
                app.compose_hash.hex(),
                app.instance_id.hex(),
            )
            device, system, aggregated = (
                app.device_id.hex(),
                app.mr_system.hex(),
                app.mr_aggregated.hex(),
            )
            image, kp_info = self.os_image_hash.hex(), app.key_provider_info.hex()
            if report is not None:
                kp = key_provider_of(app.key_provider_info)
                if kp is not None:
                    key_provider = (
                        f'{{"name": {_json_str(kp["name"])}, "id": {_json_str(kp["id"])}}}'
                    )
                scripts = app.init_script_hashes
                app_info = (
                    f'{{"app_id": "{app_id}", "compose_hash": "{compose}", '
                    f'"instance_id": "{instance}", "device_id": "{device}", '
                    f'"mrtd": "{report.mr_td.hex()}", "rtmr0": "{report.rtmr0.hex()}", '
                    f'"rtmr1": "{report.rtmr1.hex()}", "rtmr2": "{report.rtmr2.hex()}", '
                    f'"rtmr3": "{report.rtmr3.hex()}", "mr_system": "{system}", '
                    f'"mr_aggregated": "{aggregated}", "os_image_hash": "{image}", '
                    f'"key_provider_info": "{kp_info}", "init_script_hashes": '
                    + ("null" if scripts is None else _jlist([h.hex() for h in scripts]))
                    + "}"
                )
            if valid:  # boot_info (`self.boot_info`), from the same values
                boot_info = (
                    f', "boot_info": {{"teeVariant": "{TEE_VARIANT_TDX}", '
                    f'"mrAggregated": "{aggregated}", "osImageHash": "{image}", '
                    f'"mrSystem": "{system}", "appId": "{app_id}", '
                    f'"composeHash": "{compose}", "instanceId": "{instance}", '
                    f'"deviceId": "{device}", "keyProviderInfo": "{kp_info}", '
                    f'"tcbStatus": {_json_str(self.tcb_status or "")}, '
                    f'"advisoryIds": {_jlist(self.advisory_ids)}}}'
                )
        report_data = "null" if self.report_data is None else f'"{self.report_data.hex()}"'
        return (
            f'{{"is_valid": {_jb(valid)}, "details": {{'
            f'"quote_verified": {_jb(self.quote_verified)}, '
            f'"event_log_verified": {_jb(self.event_log_verified)}, '
            f'"os_image_hash_verified": {_jb(self.os_image_hash_verified)}, '
            f'"acpi_tables_verified": {_jb(self.acpi_tables_verified)}, '
            f'"os_image_is_dev": {_jb(self.os_image_is_dev)}, '
            f'"os_image_version": {_js(self.os_image_version)}, '
            f'"tee_variant": {_js(self.tee_variant)}, "report_data": {report_data}, '
            f'"tcb_status": {_js(self.tcb_status)}, '
            f'"advisory_ids": {_jlist(self.advisory_ids)}, '
            f'"key_provider": {key_provider}, "app_info": {app_info}{boot_info}}}, '
            f'"reason": {_js(self.reason)}}}'
        ).encode()


# ---------------------------------------------------------------------------------- verifier


class EvidenceVerifier:
    """DCAP with policy, RTMR3 replay, identity and OS image, each reported on its own.

    `root_ca_der`: the root quotes must chain to (None: Intel's). `images`: the OS-image
    checker; without one the os image check fails ("not configured") whenever it is asked for.
    """

    def __init__(
        self,
        collateral: CollateralCache,
        *,
        root_ca_der: bytes | None = None,
        policy: VerificationPolicy | None = None,
        images: OsImageChecker | None = None,
    ) -> None:
        self.collateral = collateral
        self.root_ca_der = root_ca_der
        self.policy = policy or VerificationPolicy(allowed_tcb_statuses=SURFACED_TCB_STATUSES)
        self.images = images

    async def verify_request(self, body: Any) -> Verification:
        """a `/verify` request body, decoded and verified; a request that cannot be decoded
        gives a result with every check false and the reason."""
        try:
            evidence = evidence_from_request(body)
        except ParseError as e:
            v = Verification()
            v.fail("request", str(e))
            return v
        return await self._verify(
            evidence.attestation, evidence.quote, vm_config=evidence.vm_config
        )

    async def verify(
        self,
        att: Attestation,
        *,
        vm_config: str = "",
        boottime_mr: bool = False,
        check_image: bool = True,
        fail_fast: bool = False,
    ) -> Verification:
        """verify `att`; `vm_config` overrides the attestation's own config (the KMS gets it
        with the request). Never raises for bad evidence: failures are in the result."""
        return await self._verify(
            att,
            None,
            vm_config=vm_config,
            boottime_mr=boottime_mr,
            check_image=check_image,
            fail_fast=fail_fast,
        )

    async def _verify(
        self,
        att: Attestation,
        parsed: Quote | None,
        *,
        vm_config: str = "",
        boottime_mr: bool = False,
        check_image: bool = True,
        fail_fast: bool = False,
    ) -> Verification:
        """`verify`; `parsed`: the request decoder's parse of `att.quote` (used only when it is
        the parse of these very bytes)."""
        v = Verification(image_required=check_image, report_data=att.report_data)
        config = vm_config or att.config
        if att.platform != "tdx":
            v.fail(QUOTE, f"unsupported platform {att.platform}")
            return v
        if parsed is not None and parsed.raw == att.quote:
            quote = parsed
        else:
            try:
                quote = parse_quote(att.quote)
            except ParseError as e:
                v.fail(QUOTE, f"malformed quote: {e}")
                return v
        report = quote.td_report
        if report is None:
            v.fail(QUOTE, "attestation quote is not a tdx quote")
            return v
        v.report = report
        ppid = await self._check_quote(att, quote, v)
        if fail_fast and v.failures:
            return v
        vm: dict[str, Any] | None = None
        vm_error = ""
        try:
            vm = load_vm_config(config)
        except ParseError as e:
            vm_error = str(e)
        self._check_event_log(
            att, report, ppid, config, vm, vm_error, bool(vm_config), boottime_mr, v
        )
        if fail_fast and v.failures:
            return v
        if check_image:
            await self._check_os_image(att, report, vm, v)
        return v

    async def _check_quote(self, att: Attestation, quote: Quote, v: Verification) -> bytes | None:
        try:
            collateral = await self.collateral.lookup(
                att.quote, root_ca_der=self.root_ca_der, parsed=quote
            )
            verified = verify_quote(
                att.quote,
                collateral,
                policy=self.policy,
                root_ca_der=self.root_ca_der,
                parsed=quote,
            )
        except VerifyError as e:
            v.fail(QUOTE, str(e))
            return None
        v.quote_verified = True
        v.tee_variant = TEE_VARIANT_TDX
        v.tcb_status = verified.status
        v.advisory_ids = verified.advisory_ids
        return verified.ppid

    def _check_event_log(
        self,
        att: Attestation,
        report: TdReport,
        ppid: bytes | None,
        config: str,
        vm: dict[str, Any] | None,
        vm_error: str,
        given: bool,
        boottime_mr: bool,
        v: Verification,
    ) -> None:
        """`vm`: `config` decoded (None: `vm_error`); `given`: it came with the request."""
        if report.report_data != att.report_data:
            v.fail(EVENT_LOG, "quote report_data does not match the attestation")
            return
        if replay_runtime_events(att.runtime_events) != report.rtmr3:
            v.fail(
                EVENT_LOG, "rtmr3 replay mismatch: the runtime event log does not match the quote"
            )
            return
        for ev in att.event_log:
            if ev.version == 2 and ev.preimage is not None and ev.is_runtime:
                runtime = ev.to_runtime_event()
                if ev.preimage != runtime.preimage() or (
                    ev.digest and ev.digest != runtime.digest()
                ):
                    v.fail(EVENT_LOG, f"runtime event {ev.event[:64]!r} has a wrong preimage")
                    return
        # the attestation's own config, when that is what `vm` was read from
        own_image = _image_hash(vm) if vm is not None and config == att.config else None
        app = AppInfo.from_attestation(
            att, boottime_mr=boottime_mr, ppid=ppid, report=report, os_image_hash=own_image
        )
        if len(app.app_id) != 20:
            v.fail(EVENT_LOG, "app_id must be 20 bytes")
            return
        if given and vm is None:
            v.fail(EVENT_LOG, vm_error)
            return
        os_image = _image_hash(vm) if given else b""
        v.os_image_hash = os_image or app.os_image_hash
        v.app_info = app
        boot = v.boot_info
        error = boot.length_error() if boot is not None else ""
        if error:
            v.app_info = None
            v.fail(EVENT_LOG, f"invalid identity: {error}")
            return
        v.event_log_verified = True

    async def _check_os_image(
        self, att: Attestation, report: TdReport, vm: dict[str, Any] | None, v: Verification
    ) -> None:
        if self.images is None:
            v.fail(OS_IMAGE, "os image verification is not configured")
            return
        if vm is None:
            v.fail(OS_IMAGE, "vm_config is not valid json")
            return
        registers = TdRegisters(report.mr_td, report.rtmr0, report.rtmr1, report.rtmr2)
        try:
            result = await self.images.check_os_image(vm, registers, att.event_log)
        except (ParseError, VerifyError) as e:
            v.fail(OS_IMAGE, str(e))
            return
        v.os_image_hash_verified = True
        v.acpi_tables_verified = result.acpi_tables_verified
        v.os_image_is_dev = result.is_dev
        v.os_image_version = result.version
        if not v.os_image_hash:
            v.os_image_hash = _image_hash(vm)
