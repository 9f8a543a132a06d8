"""from a caller's attestation to a verified BootInfo, through the shared verification core.

:class:`pydstack.attest.evidence.EvidenceVerifier` does the work: DCAP under the configured root
(Intel's, or a mock root only when the operator configured one), report_data and RTMR3 replay,
the identity measured in RTMR3 with its exact lengths, and — with `core.image.verify = true` —
the OS image: the quote's MRTD and RTMR0-2 must be what the image the CVM claims measures (the
reason names the register that differs). The KMS stops at the first failure and raises it. TCB
status is not gated here: it goes to the authorization backend, which decides. The quote's own
signatures are checked before any collateral is fetched, so a forged quote never reaches the PCCS.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydstack.attest.attestation import Attestation
from pydstack.attest.errors import VerifyError
from pydstack.attest.evidence import SURFACED_TCB_STATUSES, EvidenceVerifier, OsImageChecker
from pydstack.attest.verify import CollateralCache

from .bootinfo import BootInfo

#: kept for callers of the earlier name
ALL_STATUSES = SURFACED_TCB_STATUSES


@dataclass
class AttestationChecker:
    collateral: CollateralCache
    root_ca_der: bytes | None = None
    #: the OS-image check (`core.image.verify = true`); None skips it
    images: OsImageChecker | None = None

    def __post_init__(self) -> None:
        self.verifier = EvidenceVerifier(
            self.collateral, root_ca_der=self.root_ca_der, images=self.images
        )

    async def boot_info(
        self,
        att: Attestation,
        *,
        vm_config: str = "",
        boottime_mr: bool = False,
        check_image: bool = True,
    ) -> BootInfo:
        """the verified BootInfo of `att`; VerifyError with the first check that failed.
        `check_image=False` skips the OS image even when image verification is on (the KMS's
        own attestation)."""
        result = await self.verifier.verify(
            att,
            vm_config=vm_config,
            boottime_mr=boottime_mr,
            check_image=check_image and self.images is not None,
            fail_fast=True,
        )
        if result.failures:
            raise VerifyError(result.failures[0][1])
        boot = result.boot_info
        if boot is None:  # pragma: no cover - no failure means the event log verified
            raise VerifyError("attestation has no verified identity")
        return boot
