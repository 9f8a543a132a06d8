"""response models of the guest agent API (field names as on the wire)."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class GetTlsKeyResponse(_Model):
    key: str
    certificate_chain: list[str]

    def as_uint8array(self, max_length: int | None = None) -> bytes:
        """the DER of the private key, truncated or zero-padded to `max_length`."""
        body = "".join(
            line for line in self.key.strip().splitlines() if not line.startswith("-----")
        )
        der = base64.b64decode(body)
        if max_length is None:
            return der
        return der[:max_length].ljust(max_length, b"\0")


class GetKeyResponse(_Model):
    key: str
    signature_chain: list[str]

    def decode_key(self) -> bytes:
        return bytes.fromhex(self.key)

    def decode_signature_chain(self) -> list[bytes]:
        return [bytes.fromhex(s) for s in self.signature_chain]


class EventLog(_Model):
    imr: int
    event_type: int
    digest: str
    event: str
    event_payload: str
    version: int | None = None
    preimage: str | None = None


def _replay(digests: list[str]) -> str:
    mr = bytes(48)
    for d in digests:
        mr = hashlib.sha384(mr + bytes.fromhex(d).ljust(48, b"\0")).digest()
    return mr.hex()


class GetQuoteResponse(_Model):
    quote: str
    event_log: str
    report_data: str = ""
    vm_config: str = ""
    attestation: str = ""

    def decode_quote(self) -> bytes:
        return bytes.fromhex(self.quote.removeprefix("0x"))

    def decode_event_log(self) -> list[EventLog]:
        return [EventLog(**e) for e in json.loads(self.event_log)]

    def replay_rtmrs(self) -> dict[int, str]:
        """RTMR0-3 replayed from the event log (needs the unstripped log, as the simulator
        returns it)."""
        events = self.decode_event_log()
        return {i: _replay([e.digest for e in events if e.imr == i]) for i in range(4)}


class AttestResponse(_Model):
    attestation: str

    def decode_attestation(self) -> bytes:
        return bytes.fromhex(self.attestation)


class GpuInfoResponse(_Model):
    attestation: str = ""


class SignResponse(_Model):
    signature: str
    signature_chain: list[str]
    public_key: str

    def decode_signature(self) -> bytes:
        return bytes.fromhex(self.signature)

    def decode_signature_chain(self) -> list[bytes]:
        return [bytes.fromhex(s) for s in self.signature_chain]

    def decode_public_key(self) -> bytes:
        return bytes.fromhex(self.public_key)


class VerifyResponse(_Model):
    valid: bool


class VersionResponse(_Model):
    version: str
    rev: str


class TcbInfo(_Model):
    mrtd: str
    rtmr0: str
    rtmr1: str
    rtmr2: str
    rtmr3: str
    app_compose: str
    event_log: list[EventLog]


class TcbInfoV03x(TcbInfo):
    rootfs_hash: str | None = None


class TcbInfoV05x(TcbInfo):
    mr_aggregated: str
    os_image_hash: str
    compose_hash: str
    device_id: str


T = TypeVar("T", bound=TcbInfo)


class InfoResponse(_Model, Generic[T]):
    app_id: str
    instance_id: str
    app_cert: str
    tcb_info: T
    app_name: str
    device_id: str
    mr_aggregated: str = ""
    os_image_hash: str = ""
    key_provider_info: str
    compose_hash: str
    vm_config: str = ""
    cloud_vendor: str = ""
    cloud_product: str = ""

    @classmethod
    def parse_response(cls, obj: dict[str, Any], tcb_info_type: type[T]) -> InfoResponse[T]:
        data = dict(obj)
        tcb = data.get("tcb_info")
        if isinstance(tcb, str):
            data["tcb_info"] = tcb_info_type(**json.loads(tcb)) if tcb else None
        return cls(**data)
