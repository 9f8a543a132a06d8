"""the simulated TDX: real quotes under a mock Intel PKI, with RTMR state and an event log.

A :class:`SimulatedTdx` holds a quoting enclave (attestation key, QE report signed by the mock
PCK key), MRTD and RTMR0-2 replayed from a synthetic boot event log derived from the seed and an
OS-image identity, and RTMR3 extended by runtime events. Its quotes verify with
``dcap_qvl.verify_with_root_ca`` given the mock root and the collateral it produces, and fail
against Intel's root: this is development evidence, never a bypass.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.attest.eventlog import (
    EV_PLATFORM_CONFIG_FLAGS,
    RuntimeEvent,
    TdxEvent,
    extend_mr,
    label_acpi_events,
)
from pydstack.attest.quote import (
    ATT_KEY_TYPE_ECDSA_P256,
    INTEL_QE_VENDOR_ID,
    TEE_TYPE_TDX,
    EnclaveReport,
    QuoteHeader,
    QuoteTemplate,
    TdReport,
)

from .collateral import (
    QE_ATTRIBUTES,
    QE_ISVPRODID,
    QE_ISVSVN,
    QE_MRSIGNER,
    TEE_TCB_SVN,
    SignedCollateral,
    TcbPolicy,
    make_collateral,
    sign_raw,
)
from .mockpki import MockPki, PlatformTcb, derive_p256

TD_ATTRIBUTES = bytes.fromhex("0000001000000000")  # SEPT_VE_DISABLE, not debug
XFAM = bytes.fromhex("e702060000000000")
MR_SEAM = hashlib.sha384(b"pydstack simulated tdx module").digest()
EV_EFI_HANDOFF_TABLES2 = 0x8000000B
EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_SEPARATOR = 0x4
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_ACTION = 0x80000007
EV_EVENT_TAG = 0x6


def _raw_pub(key: ec.EllipticCurvePrivateKey) -> bytes:
    n = key.public_key().public_numbers()
    return n.x.to_bytes(32, "big") + n.y.to_bytes(32, "big")


def synthetic_boot_log(seed: bytes, os_image: str) -> tuple[bytes, list[TdxEvent]]:
    """MRTD and a plausible TDX boot event log for a simulated firmware/kernel/initrd.

    Digests are sha384 of labelled strings of the OS-image identity, so two simulators of the
    same image agree on MRTD/RTMR0-2, and another image gives other measurements.
    """

    def d(label: str) -> bytes:
        return hashlib.sha384(f"pydstack-sim:{os_image}:{label}".encode()).digest()

    mrtd = d("mrtd")
    boot: list[tuple[int, int, str, bytes]] = [
        (0, EV_EFI_HANDOFF_TABLES2, "td-hob", b"TdxTable"),
        (0, EV_EFI_PLATFORM_FIRMWARE_BLOB2, "cfv", b"CFV"),
        (0, EV_EFI_VARIABLE_DRIVER_CONFIG, "secure-boot", b"SecureBoot"),
        (0, EV_SEPARATOR, "separator", b"\0\0\0\0"),
        (0, EV_PLATFORM_CONFIG_FLAGS, "acpi-loader", b"ACPI DATA"),
        (0, EV_PLATFORM_CONFIG_FLAGS, "acpi-rsdp", b"ACPI DATA"),
        (0, EV_PLATFORM_CONFIG_FLAGS, "acpi-tables", b"ACPI DATA"),
        (1, EV_EFI_BOOT_SERVICES_APPLICATION, "kernel", b""),
        (1, EV_EFI_ACTION, "calling-efi", b"Calling EFI Application from Boot Option"),
        (1, EV_SEPARATOR, "separator", b"\0\0\0\0"),
        (2, EV_EVENT_TAG, "cmdline", b"LOADED_IMAGE::LoadOptions"),
        (2, EV_EVENT_TAG, "initrd", b"Linux initrd"),
    ]
    events = [
        TdxEvent(imr, et, d(f"rtmr{imr}:{label}"), "", payload) for imr, et, label, payload in boot
    ]
    return mrtd, label_acpi_events(events)


def synthetic_measurements(os_image: str) -> tuple[bytes, bytes, bytes, bytes]:
    """MRTD and RTMR0-2 of a simulated TD booted from `os_image`: what its quotes carry, so an
    image can ship them as its expected measurement (the seed does not change them)."""
    mrtd, events = synthetic_boot_log(b"", os_image)
    rtmrs = [bytes(48)] * 3
    for ev in events:
        rtmrs[ev.imr] = extend_mr(rtmrs[ev.imr], ev.digest)
    return mrtd, rtmrs[0], rtmrs[1], rtmrs[2]


class SimulatedTdx:
    """a simulated TD: quote generation, RTMR state and event log."""

    simulated = True
    in_process = True

    def __init__(
        self,
        seed: bytes,
        *,
        os_image: str = "pydstack-sim",
        mr_config_id: bytes = bytes(48),
        tcb_policy: TcbPolicy | None = None,
        debug: bool = False,
        platform: PlatformTcb | None = None,
    ) -> None:
        """`platform` overrides what the PCK certificate says (FMSPC, PPID, TCB); the keys and
        the root stay those of `seed`, so TDs of one seed on several platforms share a root."""
        self.pki = MockPki(seed, platform)
        self.td_attributes = bytes([TD_ATTRIBUTES[0] | (1 if debug else 0)]) + TD_ATTRIBUTES[1:]
        self.seed = seed
        self.tcb_policy = tcb_policy or TcbPolicy()
        self.mr_config_id = mr_config_id.ljust(48, b"\0")
        self.mrtd, boot = synthetic_boot_log(seed, os_image)
        self._boot_events = boot
        self._runtime: list[RuntimeEvent] = []
        self._rtmrs = [bytes(48)] * 4
        for ev in boot:
            self._rtmrs[ev.imr] = extend_mr(self._rtmrs[ev.imr], ev.digest)
        self._lock = threading.Lock()
        self._att_key = derive_p256(seed, "tdx-qe-attestation")
        self._qe_auth = hashlib.sha256(b"qe-auth" + seed).digest()
        qe_report_data = hashlib.sha256(_raw_pub(self._att_key) + self._qe_auth).digest()
        qe_report = EnclaveReport(
            cpu_svn=self.pki.platform.cpu_svn,
            misc_select=0,
            attributes=QE_ATTRIBUTES,
            mr_enclave=hashlib.sha256(b"pydstack simulated td quoting enclave").digest(),
            mr_signer=QE_MRSIGNER,
            isv_prod_id=QE_ISVPRODID,
            isv_svn=QE_ISVSVN,
            report_data=qe_report_data.ljust(64, b"\0"),
        )
        self._qe_report = qe_report.to_bytes()
        self._qe_report_sig = sign_raw(self.pki.pck_key, self._qe_report)
        self._header = QuoteHeader(
            version=4,
            attestation_key_type=ATT_KEY_TYPE_ECDSA_P256,
            tee_type=TEE_TYPE_TDX,
            qe_svn=0,
            pce_svn=self.pki.platform.pce_svn,
            qe_vendor_id=INTEL_QE_VENDOR_ID,
            user_data=hashlib.sha256(b"qeid" + seed).digest()[:16] + bytes(4),
        )
        self._chain = self.pki.pck_chain_pem.encode()
        self._quote_template = QuoteTemplate(
            self._header,
            attestation_key=_raw_pub(self._att_key),
            qe_report=self._qe_report,
            qe_report_signature=self._qe_report_sig,
            qe_auth_data=self._qe_auth,
            pck_cert_chain_pem=self._chain,
        )

    # ---------------------------------------------------------------- measurement
    def extend_rtmr3(self, event: RuntimeEvent) -> None:
        """extend RTMR3 and append to the event log as one critical section."""
        digest = event.digest()
        with self._lock:
            self._rtmrs[3] = extend_mr(self._rtmrs[3], digest)
            self._runtime.append(event)

    def extend_events(self, events: Iterable[RuntimeEvent]) -> None:
        for ev in events:
            self.extend_rtmr3(ev)

    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        with self._lock:
            return self._rtmrs[0], self._rtmrs[1], self._rtmrs[2], self._rtmrs[3]

    def runtime_events(self) -> list[RuntimeEvent]:
        with self._lock:
            return list(self._runtime)

    def event_log(self) -> list[TdxEvent]:
        with self._lock:
            return self._boot_events + [e.to_tdx_event() for e in self._runtime]

    # ---------------------------------------------------------------- quotes
    def td_report(self, report_data: bytes) -> TdReport:
        if len(report_data) > 64:
            raise ValueError("report data is longer than 64 bytes")
        r0, r1, r2, r3 = self.rtmrs()
        return TdReport(
            tee_tcb_svn=TEE_TCB_SVN,
            mr_seam=MR_SEAM,
            mr_signer_seam=bytes(48),
            seam_attributes=bytes(8),
            td_attributes=self.td_attributes,
            xfam=XFAM,
            mr_td=self.mrtd,
            mr_config_id=self.mr_config_id,
            mr_owner=bytes(48),
            mr_owner_config=bytes(48),
            rtmr0=r0,
            rtmr1=r1,
            rtmr2=r2,
            rtmr3=r3,
            report_data=report_data.ljust(64, b"\0"),
        )

    def get_quote(self, report_data: bytes) -> bytes:
        """a v4 quote over `report_data` (zero-padded to 64 bytes) and the current RTMRs."""
        report = self.td_report(report_data).to_bytes()
        return self._quote_template.build(report, lambda data: sign_raw(self._att_key, data))

    # ---------------------------------------------------------------- trust material
    @property
    def root_ca_der(self) -> bytes:
        return self.pki.root_ca_der

    def collateral(self, issue: dt.datetime | None = None) -> SignedCollateral:
        return make_collateral(self.pki, issue=issue, policy=self.tcb_policy)

    def collateral_json(self, issue: dt.datetime | None = None) -> str:
        return self.collateral(issue).to_qvl_json()
