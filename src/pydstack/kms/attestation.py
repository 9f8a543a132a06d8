"""from a caller's attestation to a verified BootInfo.

DCAP verification of the quote (under the configured root: Intel's, or a mock root only when the
operator configured one), the quote's report_data equal to the attestation's, RTMR3 equal to the
replay of the runtime events, then the identity measured in RTMR3, whose hashes must have their
exact lengths (32 bytes). TCB status is not gated here: it goes to the authorization backend,
which decides. The quote's own signatures are checked before any collateral is looked up
(`CollateralCache.get` prechecks), so a forged quote never reaches the PCCS.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydstack.attest.attestation import Attestation
from pydstack.attest.errors import VerifyError
from pydstack.attest.eventlog import replay_runtime_events
from pydstack.attest.identity import AppInfo, os_image_hash_from_config
from pydstack.attest.verify import CollateralCache, VerificationPolicy, verify_quote
from pydstack.types import jsonlimits

from .bootinfo import BootInfo

ALL_STATUSES = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
    }
)


@dataclass
class AttestationChecker:
    collateral: CollateralCache
    root_ca_der: bytes | None = None

    async def boot_info(
        self, att: Attestation, *, vm_config: str = "", boottime_mr: bool = False
    ) -> BootInfo:
        if att.platform != "tdx":
            raise VerifyError(f"unsupported platform {att.platform}")
        collateral = await self.collateral.get(att.quote, root_ca_der=self.root_ca_der)
        # the kms surfaces the tcb status to the auth backend instead of gating on it
        policy = VerificationPolicy(allowed_tcb_statuses=ALL_STATUSES)
        verified = verify_quote(att.quote, collateral, policy=policy, root_ca_der=self.root_ca_der)
        report = verified.quote.td_report
        if report is None:
            raise VerifyError("attestation quote is not a tdx quote")
        if report.report_data != att.report_data:
            raise VerifyError("quote report_data does not match the attestation")
        if replay_runtime_events(att.runtime_events) != report.rtmr3:
            raise VerifyError(
                "rtmr3 replay mismatch: the runtime event log does not match the quote"
            )
        for ev in att.runtime_events:
            if ev.version == 2 and ev.to_tdx_event().preimage is None:  # pragma: no cover
                raise VerifyError("runtime event preimage missing")
        app = AppInfo.from_attestation(att, boottime_mr=boottime_mr, ppid=verified.ppid)
        if len(app.app_id) != 20:
            raise VerifyError("app_id must be 20 bytes")
        os_image = os_image_hash_from_config(vm_config) if vm_config else b""
        if not os_image:
            os_image = app.os_image_hash
        if vm_config:
            try:
                jsonlimits.loads(vm_config)
            except ValueError as e:
                raise VerifyError(f"vm_config is not valid json: {e}") from e
        boot = BootInfo(
            tee_variant="dstack-tdx",
            mr_aggregated=app.mr_aggregated,
            os_image_hash=os_image,
            mr_system=app.mr_system,
            app_id=app.app_id,
            compose_hash=app.compose_hash,
            instance_id=app.instance_id,
            device_id=app.device_id,
            key_provider_info=app.key_provider_info,
            tcb_status=verified.status,
            advisory_ids=verified.advisory_ids,
        )
        error = boot.length_error()
        if error:
            raise VerifyError(f"invalid identity: {error}")
        return boot
