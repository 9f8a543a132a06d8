"""the agent's prpc services: DstackGuest (dstack.sock), Tappd (tappd.sock), Worker (external).

Each method converts the protobuf request, calls :class:`~pydstack.guest.core.GuestCore` off the
event loop (quotes and signatures are CPU work) and converts the result back.
"""

from __future__ import annotations

import asyncio
import binascii
import json
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

from google.protobuf.empty_pb2 import Empty

from pydstack import UPSTREAM_VERSION, __version__
from pydstack.rpc.calls import CallContext, Encoded, PrpcService
from pydstack.rpc.errors import RpcError
from pydstack.rpc.proto import agent_rpc_pb2 as pb

from .core import KEY_CACHE_SIZE, AgentError, GuestCore, InfoResult, QuoteResult

T = TypeVar("T")
GUEST = pb.DESCRIPTOR.services_by_name["DstackGuest"]
TAPPD = pb.DESCRIPTOR.services_by_name["Tappd"]
WORKER = pb.DESCRIPTOR.services_by_name["Worker"]


async def _run(fn: Callable[[], T]) -> T:
    try:
        return await asyncio.to_thread(fn)
    except AgentError as e:
        raise RpcError(str(e)) from e


class _Replies:
    """the encoded answers that do not change within a boot: Info (until RTMR3 moves) and each
    key already derived (at most KEY_CACHE_SIZE, least recently used dropped). Per process, so
    per boot; keys are kept per (path, purpose, algorithm), as the core keeps them. Each service
    object holds its own."""

    def __init__(self, core: GuestCore) -> None:
        self.core = core
        self._info: dict[bool, tuple[InfoResult, Encoded]] = {}
        self._keys: OrderedDict[tuple[str, str, str], Encoded] = OrderedDict()

    async def info(self, *, external: bool) -> Encoded:
        result = await _cached_info(self.core, external=external)
        hit = self._info.get(external)
        if hit is not None and hit[0] is result:
            return hit[1]
        reply = Encoded(_info(result))
        self._info[external] = (result, reply)
        return reply

    async def key(self, path: str, purpose: str, algorithm: str) -> Encoded:
        index = (path, purpose, algorithm)
        reply = self._keys.get(index)
        if reply is not None:
            self._keys.move_to_end(index)
            return reply
        hit = self.core.cached_key(path, purpose, algorithm)
        if hit is None:  # first time this boot: the derivation and signatures, off the loop
            hit = await _run(lambda: self.core.get_key(path, purpose, algorithm))
        key, chain = hit
        reply = self._keys[index] = Encoded(pb.GetKeyResponse(key=key, signature_chain=chain))
        while len(self._keys) > KEY_CACHE_SIZE:
            self._keys.popitem(last=False)
        return reply


async def _cached_info(core: GuestCore, *, external: bool) -> InfoResult:
    """Info from memory when this boot computed it already, else computed off the loop."""
    hit = core.cached_info(external=external)
    if hit is not None:
        return hit
    return await _run(lambda: core.info(external=external))


def _info(r: InfoResult) -> pb.AppInfo:
    return pb.AppInfo(
        app_id=r.app_id,
        instance_id=r.instance_id,
        app_cert=r.app_cert,
        tcb_info=r.tcb_info,
        app_name=r.app_name,
        device_id=r.device_id,
        mr_aggregated=r.mr_aggregated,
        os_image_hash=r.os_image_hash,
        key_provider_info=r.key_provider_info,
        compose_hash=r.compose_hash,
        vm_config=r.vm_config,
        cloud_vendor=r.cloud_vendor,
        cloud_product=r.cloud_product,
    )


def _quote(r: QuoteResult) -> pb.GetQuoteResponse:
    return pb.GetQuoteResponse(
        quote=r.quote,
        event_log=r.event_log,
        report_data=r.report_data,
        vm_config=r.vm_config,
        attestation=r.attestation,
    )


class _QuoteReply(Encoded):
    """GetQuote's answer. Its JSON is written from parts: the hex of what changes per call (quote,
    report data, attestation; the encoder's where it made them) between the JSON strings of the
    event log and the VM config, which :class:`_QuoteTexts` escapes once per evidence. The bytes
    equal ``message_to_json``'s (a test compares them). The protobuf message is only built for a
    protobuf answer."""

    __slots__ = ("_result", "_texts")

    def __init__(self, result: QuoteResult, texts: tuple[bytes, bytes]) -> None:
        # no message yet: json() writes from the result, proto() builds it
        self._json = {}
        self._proto = None
        self._result = result
        self._texts = texts

    def json(self, omit_empty: frozenset[str]) -> bytes:
        r = self._result
        event_log, vm_config = self._texts
        parts = [
            b'{"quote":"',
            r.quote_hex or binascii.hexlify(r.quote),
            b'","event_log":',
            event_log,
            b',"report_data":"',
            binascii.hexlify(r.report_data),
            b'","vm_config":',
            vm_config,
        ]
        if r.attestation or "attestation" not in omit_empty:
            hexed = r.attestation_hex or binascii.hexlify(r.attestation)
            parts += (b',"attestation":"', hexed, b'"}')
        else:
            parts.append(b"}")
        return b"".join(parts)

    def proto(self) -> bytes:
        if self._proto is None:
            self._proto = _quote(self._result).SerializeToString()
        return self._proto


class _QuoteTexts:
    """the JSON strings of the last event log and VM config quotes carried (they change only
    when a runtime event is added)."""

    def __init__(self) -> None:
        self._key: tuple[str, str] | None = None
        self._texts = (b"", b"")

    def reply(self, result: QuoteResult) -> _QuoteReply:
        key = (result.event_log, result.vm_config)
        if self._key is None or self._key[0] is not key[0] or self._key[1] != key[1]:
            self._texts = (json.dumps(key[0]).encode(), json.dumps(key[1]).encode())
            self._key = key
        return _QuoteReply(result, self._texts)


def version_message() -> pb.WorkerVersion:
    return pb.WorkerVersion(version=UPSTREAM_VERSION, rev=f"pydstack-{__version__}")


class DstackGuestService:
    def __init__(self, core: GuestCore) -> None:
        self.core = core
        self.replies = _Replies(core)
        self.quotes = _QuoteTexts()

    async def GetTlsKey(self, req: pb.GetTlsKeyArgs, ctx: CallContext) -> pb.GetTlsKeyResponse:
        nb = req.not_before if req.HasField("not_before") else None
        na = req.not_after if req.HasField("not_after") else None
        key, chain = await _run(
            lambda: self.core.get_tls_key(
                req.subject,
                list(req.alt_names),
                usage_ra_tls=req.usage_ra_tls,
                usage_server_auth=req.usage_server_auth,
                usage_client_auth=req.usage_client_auth,
                not_before=nb,
                not_after=na,
                with_app_info=req.with_app_info,
            )
        )
        return pb.GetTlsKeyResponse(key=key, certificate_chain=chain)

    async def GetKey(self, req: pb.GetKeyArgs, ctx: CallContext) -> Encoded:
        return await self.replies.key(req.path, req.purpose, req.algorithm)

    async def GetQuote(self, req: pb.RawQuoteArgs, ctx: CallContext) -> Encoded:
        if self.core.platform.in_process:  # signing here: a thread would only add GIL handoffs
            try:
                return self.quotes.reply(self.core.get_quote(req.report_data))
            except AgentError as e:
                raise RpcError(str(e)) from e
        return self.quotes.reply(await _run(lambda: self.core.get_quote(req.report_data)))

    async def Attest(self, req: pb.RawQuoteArgs, ctx: CallContext) -> pb.AttestResponse:
        return pb.AttestResponse(attestation=await _run(lambda: self.core.attest(req.report_data)))

    async def EmitEvent(self, req: pb.EmitEventArgs, ctx: CallContext) -> Empty:
        if self.core.platform.simulated:
            raise RpcError(f"runtime event emission is unavailable in simulator mode: {req.event}")
        raise RpcError(
            "EmitEvent was removed in dstack 0.6.0: runtime events are measured by the system only"
        )

    async def Info(self, req: Empty, ctx: CallContext) -> Encoded:
        return await self.replies.info(external=False)

    async def GpuInfo(self, req: Empty, ctx: CallContext) -> pb.GpuInfoResponse:
        return pb.GpuInfoResponse(attestation=await _run(self.core.gpu_info))

    async def Sign(self, req: pb.SignRequest, ctx: CallContext) -> pb.SignResponse:
        sig, chain, pub = await _run(lambda: self.core.sign(req.algorithm, req.data))
        return pb.SignResponse(signature=sig, signature_chain=chain, public_key=pub)

    async def Verify(self, req: pb.VerifyRequest, ctx: CallContext) -> pb.VerifyResponse:
        valid = await _run(
            lambda: self.core.verify(req.algorithm, req.data, req.signature, req.public_key)
        )
        return pb.VerifyResponse(valid=valid)

    async def Version(self, req: Empty, ctx: CallContext) -> pb.WorkerVersion:
        return version_message()


class TappdService:
    def __init__(self, core: GuestCore) -> None:
        self.core = core
        self.replies = _Replies(core)

    async def DeriveKey(self, req: pb.DeriveKeyArgs, ctx: CallContext) -> pb.GetTlsKeyResponse:
        key, chain = await _run(
            lambda: self.core.derive_tappd_key(
                req.path,
                req.subject or req.path,
                list(req.alt_names),
                usage_ra_tls=req.usage_ra_tls,
                usage_server_auth=req.usage_server_auth,
                usage_client_auth=req.usage_client_auth,
                random_seed=req.random_seed,
            )
        )
        return pb.GetTlsKeyResponse(key=key, certificate_chain=chain)

    async def DeriveK256Key(self, req: pb.GetKeyArgs, ctx: CallContext) -> pb.DeriveK256KeyResponse:
        key, chain = await _run(lambda: self.core.get_key(req.path, req.purpose, req.algorithm))
        return pb.DeriveK256KeyResponse(k256_key=key, k256_signature_chain=chain)

    async def TdxQuote(self, req: pb.TdxQuoteArgs, ctx: CallContext) -> pb.TdxQuoteResponse:
        res, alg, prefix = await _run(
            lambda: self.core.tdx_quote(req.report_data, req.hash_algorithm, req.prefix)
        )
        return pb.TdxQuoteResponse(
            quote=res.quote, event_log=res.event_log, hash_algorithm=alg, prefix=prefix
        )

    async def RawQuote(self, req: pb.RawQuoteArgs, ctx: CallContext) -> pb.TdxQuoteResponse:
        res, alg, prefix = await _run(lambda: self.core.tdx_quote(req.report_data, "raw", ""))
        return pb.TdxQuoteResponse(
            quote=res.quote, event_log=res.event_log, hash_algorithm=alg, prefix=prefix
        )

    async def Info(self, req: Empty, ctx: CallContext) -> Encoded:
        return await self.replies.info(external=False)

    async def Version(self, req: Empty, ctx: CallContext) -> pb.WorkerVersion:
        return version_message()


class WorkerService:
    def __init__(self, core: GuestCore) -> None:
        self.core = core
        self.replies = _Replies(core)

    async def Info(self, req: Empty, ctx: CallContext) -> Encoded:
        return await self.replies.info(external=True)

    async def Version(self, req: Empty, ctx: CallContext) -> pb.WorkerVersion:
        return version_message()

    async def GetAttestationForAppKey(
        self, req: pb.GetAttestationForAppKeyRequest, ctx: CallContext
    ) -> pb.GetQuoteResponse:
        return _quote(await _run(lambda: self.core.get_attestation_for_app_key(req.algorithm)))


QUOTE_OMIT = {
    "GetQuote": frozenset({"attestation"}),
    "GetAttestationForAppKey": frozenset({"attestation"}),
}


#: methods callable with GET: side-effect free queries (EmitEvent, which extends RTMR3, is POST
#: only, and so are the other key and signing calls). Upstream's SDKs always POST; its curl
#: examples GET Info, GetQuote and GetKey; its watchdog GETs Worker.Version. A GET response is
#: not readable cross-origin, and the guard refuses cross-site and rebound requests.
GUEST_GET_METHODS = frozenset(
    {"Info", "Version", "GetQuote", "GetKey", "Attest", "GpuInfo", "Verify"}
)
TAPPD_GET_METHODS = frozenset({"Info", "Version", "TdxQuote", "RawQuote"})
WORKER_GET_METHODS = frozenset({"Info", "Version", "GetAttestationForAppKey"})


def guest_service(core: GuestCore) -> PrpcService:
    return PrpcService(
        GUEST,
        DstackGuestService(core),
        prefix="/",
        omit_empty=QUOTE_OMIT,
        get_methods=GUEST_GET_METHODS,
    )


def tappd_service(core: GuestCore) -> PrpcService:
    return PrpcService(
        TAPPD, TappdService(core), prefix="/prpc/", trim="Tappd.", get_methods=TAPPD_GET_METHODS
    )


def worker_service(core: GuestCore) -> PrpcService:
    return PrpcService(
        WORKER,
        WorkerService(core),
        prefix="/prpc/",
        trim="Worker.",
        omit_empty=QUOTE_OMIT,
        get_methods=WORKER_GET_METHODS,
    )
