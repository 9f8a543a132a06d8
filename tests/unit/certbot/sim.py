"""test helpers for the certbot: a simulated TD that attests report data the way a guest agent's
GetQuote and Attest would, and the verifier that accepts it."""

from __future__ import annotations

import json
from pathlib import Path

from pydstack.attest.attestation import Attestation, encode_v0
from pydstack.attest.eventlog import RuntimeEvent, event_log_to_json
from pydstack.attest.evidence import EvidenceVerifier
from pydstack.attest.verify import CollateralCache
from pydstack.certbot.attest import Quoted
from pydstack.mr.store import ImageStore
from pydstack.mr.verify import OsImageVerifier
from pydstack.tee.simulated import SimulatedTdx
from pydstack.vmm.backends.sandbox.image import ensure_sandbox_image, sandbox_image_digest

SEED = bytes.fromhex("5d" * 32)
DIGEST = sandbox_image_digest()
VM_CONFIG = json.dumps({"os_image_hash": DIGEST, "cpu_count": 1, "memory_size": 1 << 30})


class SimAttester:
    """an attester over a simulated TD (app id 0x11.., a kms key provider)."""

    def __init__(self, seed: bytes = SEED) -> None:
        self.tdx = SimulatedTdx(seed, os_image=DIGEST)
        for ev in (
            RuntimeEvent("app-id", b"\x11" * 20),
            RuntimeEvent("compose-hash", b"\x22" * 32),
            RuntimeEvent("instance-id", b"\x33" * 20),
            RuntimeEvent("boot-mr-done", b""),
            RuntimeEvent("key-provider", b'{"name":"kms","id":"00"}'),
            RuntimeEvent("system-ready", b""),
        ):
            self.tdx.extend_rtmr3(ev)
        self.calls: list[bytes] = []
        self.fail = False

    async def __call__(self, report_data: bytes) -> Quoted:
        if self.fail:
            raise RuntimeError("the guest agent is gone")
        self.calls.append(report_data)
        quote = self.tdx.get_quote(report_data)
        body = {
            "quote": quote.hex(),
            "event_log": event_log_to_json(self.tdx.event_log()),
            "report_data": report_data.hex(),
            "vm_config": VM_CONFIG,
        }
        att = Attestation(
            quote,
            tuple(self.tdx.event_log()),
            tuple(self.tdx.runtime_events()),
            report_data,
            VM_CONFIG,
        )
        return Quoted(json.dumps(body), encode_v0(att).hex())


def sim_verifier(images: Path, seed: bytes = SEED) -> EvidenceVerifier:
    """the evidence path configured for `seed`'s mock root, collateral and the sandbox image."""
    ensure_sandbox_image(images)
    tdx = SimulatedTdx(seed)
    cache = CollateralCache(None)
    cache.put(tdx.pki.platform.fmspc.hex(), tdx.collateral_json())
    return EvidenceVerifier(
        cache, root_ca_der=tdx.root_ca_der, images=OsImageVerifier(ImageStore(images))
    )
