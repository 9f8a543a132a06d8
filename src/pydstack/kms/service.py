"""the KMS's prpc service (mounted at /prpc, "KMS." trimmed), on TLS with optional client certs.

GetAppKey and GetKmsKey need a client certificate signed by the temp CA that carries an
attestation bound to its key (RA-TLS); the attestation is DCAP-verified, RTMR3 replayed, the
BootInfo sent to the auth backend, and only then are keys derived. Errors of the KMS's own
backends (auth api, guest agent) reach callers as a short reason; the detail goes to the log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.empty_pb2 import Empty

from pydstack.attest.attestation import decode_versioned
from pydstack.attest.errors import AttestError
from pydstack.attest.identity import AppInfo
from pydstack.attest.ratls import verify_cert_binding
from pydstack.crypto.certs import CertRequest, cert_pem, issue_cert, key_pem
from pydstack.crypto.csr import CertSigningRequestV2
from pydstack.rpc.client import PrpcClient
from pydstack.rpc.proto import agent_rpc_pb2 as agent_pb
from pydstack.rpc.proto import kms_rpc_pb2 as pb
from pydstack.rpc.server import CallContext, PrpcService, RpcError

from .attestation import AttestationChecker
from .auth import AuthBackend
from .bootinfo import BootInfo
from .derive import app_ca, derive_app_keys, env_public_key
from .keys import KmsKeys

log = logging.getLogger(__name__)
KMS = pb.DESCRIPTOR.services_by_name["KMS"]


@dataclass
class Counters:
    attestation_requests: int = 0
    attestation_failures: int = 0


class SelfNotAllowed(RpcError):
    """this KMS's own auth backend denies it; callers see the reason, and `identity` (device id,
    aggregated MR, OS image this KMS computed for itself) is for the operator's log and console."""

    def __init__(self, reason: str, identity: str) -> None:
        super().__init__(f"KMS is not allowed: {reason}")
        self.identity = identity


@dataclass
class KmsState:
    keys: KmsKeys
    auth: AuthBackend
    checker: AttestationChecker
    cert_dir: Path
    key_epoch: int = 0
    enforce_self_authorization: bool = False
    guest_agent: str = ""
    counters: Counters = field(default_factory=Counters)
    _self_boot: BootInfo | None = None

    async def self_boot_info(self) -> BootInfo:
        """this KMS's own BootInfo, from its guest agent's attestation (verified, cached)."""
        if self._self_boot is None:
            async with PrpcClient(self.guest_agent, prefix="/") as agent:
                resp = await agent.call(
                    "Attest", agent_pb.RawQuoteArgs(report_data=bytes(64)), agent_pb.AttestResponse
                )
            att = decode_versioned(resp.attestation)
            # as upstream: the kms's own image is the operator's choice, not checked here
            self._self_boot = await self.checker.boot_info(att, check_image=False)
        return self._self_boot

    async def ensure_self_allowed(self) -> None:
        if not self.enforce_self_authorization:
            return
        try:
            boot = await self.self_boot_info()
        except (AttestError, RpcError, OSError) as e:
            log.warning("kms self-attestation failed: %s", e)
            raise RpcError("KMS self-attestation failed") from e
        decision = await self.auth.is_kms_allowed(boot)
        if not decision.is_allowed:
            identity = boot.kms_identity()
            log.error(
                "the %s auth backend denies this kms: %s (this kms: %s)",
                self.auth.name,
                decision.reason,
                identity,
            )
            raise SelfNotAllowed(decision.reason, identity)


class KmsService:
    def __init__(self, state: KmsState) -> None:
        self.s = state

    async def _caller_boot(
        self, ctx: CallContext, vm_config: str, *, boottime: bool = False
    ) -> BootInfo:
        self.s.counters.attestation_requests += 1
        if ctx.peer_cert is None:
            self.s.counters.attestation_failures += 1
            raise RpcError("No attestation provided")
        try:
            att = verify_cert_binding(ctx.peer_cert)
            return await self.s.checker.boot_info(att, vm_config=vm_config, boottime_mr=boottime)
        except AttestError as e:
            self.s.counters.attestation_failures += 1
            raise RpcError(f"attestation refused: {e}") from e

    async def GetAppKey(self, req: pb.GetAppKeyRequest, ctx: CallContext) -> pb.AppKeyResponse:
        if req.api_version > 1:
            raise RpcError(f"unsupported api version {req.api_version}")
        await self.s.ensure_self_allowed()
        boot = await self._caller_boot(ctx, req.vm_config)
        decision = await self.s.auth.is_app_allowed(boot)
        if not decision.is_allowed:
            self.s.counters.attestation_failures += 1
            log.info("denied app %s: %s", boot.app_id.hex(), decision.reason)
            raise RpcError(f"Boot denied: {decision.reason}")
        k = self.s.keys
        keys = derive_app_keys(
            k.root_ca_key, k.root_k256, boot.app_id, boot.instance_id, self.s.key_epoch
        )
        log.info("issued keys to app %s instance %s", boot.app_id.hex(), boot.instance_id.hex())
        return pb.AppKeyResponse(
            ca_cert=k.ca_pem,
            disk_crypt_key=keys.disk_crypt_key,
            env_crypt_key=keys.env_crypt_key,
            k256_key=keys.k256_key,
            k256_signature=keys.k256_signature,
            tproxy_app_id=decision.gateway_app_id,
            gateway_app_id=decision.gateway_app_id,
            os_image_hash=boot.os_image_hash,
        )

    async def GetKmsKey(self, req: pb.GetKmsKeyRequest, ctx: CallContext) -> pb.KmsKeyResponse:
        await self.s.ensure_self_allowed()
        boot = await self._caller_boot(ctx, req.vm_config)
        decision = await self.s.auth.is_kms_allowed(boot)
        if not decision.is_allowed:
            raise RpcError(f"KMS is not allowed: {decision.reason}")
        k = self.s.keys
        log.info("released root keys to kms %s", boot.mr_aggregated.hex())
        return pb.KmsKeyResponse(
            temp_ca_key=key_pem(k.tmp_ca_key),
            keys=[pb.KmsKeys(ca_key=key_pem(k.root_ca_key), k256_key=k.root_k256)],
        )

    async def GetAppEnvEncryptPubKey(self, req: pb.AppId, ctx: CallContext) -> pb.PublicKeyResponse:
        if len(req.app_id) != 20:
            raise RpcError("app_id must be 20 bytes")
        await self.s.ensure_self_allowed()
        k = self.s.keys
        env = env_public_key(k.root_ca_key, k.root_k256, req.app_id, self.s.key_epoch)
        return pb.PublicKeyResponse(
            public_key=env.public_key,
            signature=env.signature,
            timestamp=env.timestamp,
            signature_v1=env.signature_v1,
        )

    async def GetMeta(self, req: Empty, ctx: CallContext) -> pb.GetMetaResponse:
        k = self.s.keys
        try:
            info = await self.s.auth.info()
        except Exception as e:  # any backend failure: the caller learns only that it failed
            log.warning("auth api info failed: %s: %s", type(e).__name__, e)
            raise RpcError("auth api info failed") from e
        resp = pb.GetMetaResponse(
            ca_cert=k.ca_pem,
            allow_any_upgrade=self.s.auth.is_dev,
            k256_pubkey=k.k256_pubkey,
            is_dev=self.s.auth.is_dev,
        )
        bootstrap = self.s.cert_dir / "bootstrap-info.json"
        if bootstrap.exists():
            doc = json.loads(bootstrap.read_text())
            resp.bootstrap_info.CopyFrom(
                pb.BootstrapResponse(
                    ca_pubkey=bytes.fromhex(doc.get("ca_pubkey", "")),
                    k256_pubkey=bytes.fromhex(doc.get("k256_pubkey", "")),
                    attestation=bytes.fromhex(doc.get("attestation", "")),
                )
            )
        if info.get("gatewayAppId"):
            resp.gateway_app_id = str(info["gatewayAppId"])
        if info.get("kmsContractAddr"):
            resp.kms_contract_address = str(info["kmsContractAddr"])
        if info.get("chainId"):
            resp.chain_id = int(info["chainId"])
        if info.get("appImplementation"):
            resp.app_auth_implementation = str(info["appImplementation"])
        return resp

    async def GetTempCaCert(self, req: Empty, ctx: CallContext) -> pb.GetTempCaCertResponse:
        await self.s.ensure_self_allowed()
        k = self.s.keys
        return pb.GetTempCaCertResponse(
            temp_ca_cert=cert_pem(k.tmp_ca_cert),
            temp_ca_key=key_pem(k.tmp_ca_key),
            ca_cert=k.ca_pem,
        )

    async def SignCert(self, req: pb.SignCertRequest, ctx: CallContext) -> pb.SignCertResponse:
        """a certificate for the CSR's key, signed by the app's CA, when the CSR (SCALE, at most
        `MAX_CSR_SIZE`) is signed by its key and carries an attestation bound to that key that
        verifies and is allowed. Every refusal is an RpcError naming why; the cost is one CSR
        decode, two ECDSA verifications, the attestation's verification (cached PCK chains and
        collateral) and one certificate, linear in the CSR's size."""
        if req.api_version != 2:
            raise RpcError(f"unsupported csr api version {req.api_version} (only 2)")
        await self.s.ensure_self_allowed()
        try:
            csr = CertSigningRequestV2.decode(req.csr)
            csr.verify(req.signature)
            att = decode_versioned(csr.attestation)
        except (AttestError, ValueError) as e:
            raise RpcError(f"invalid csr: {e}") from e
        from pydstack.attest.report_data import ratls_report_data

        if att.report_data != ratls_report_data(csr.pubkey):
            raise RpcError("csr attestation is not bound to the csr key")
        self.s.counters.attestation_requests += 1
        try:
            boot = await self.s.checker.boot_info(att, vm_config=req.vm_config, boottime_mr=True)
        except AttestError as e:
            self.s.counters.attestation_failures += 1
            raise RpcError(f"attestation refused: {e}") from e
        decision = await self.s.auth.is_app_allowed(boot)
        if not decision.is_allowed:
            raise RpcError(f"Boot denied: {decision.reason}")
        from cryptography.hazmat.primitives import serialization

        pub = serialization.load_der_public_key(csr.pubkey)
        k = self.s.keys
        ca_key, ca_cert = app_ca(k.root_ca_key, k.root_ca_cert, boot.app_id)
        c = csr.config
        app_info = None
        if c.ext_app_info:
            app_info = AppInfo.from_attestation(att, boottime_mr=True).to_msgpack()
        cert_req = CertRequest(
            subject=c.subject,
            org_name=c.org_name,
            alt_names=c.subject_alt_names,
            usage_server_auth=c.usage_server_auth,
            usage_client_auth=c.usage_client_auth,
            not_before=c.not_before,
            not_after=c.not_after,
            app_id=boot.app_id,
            special_usage="app:custom",
            attestation=csr.attestation if c.ext_quote else None,
            app_info=app_info,
        )
        try:
            leaf = issue_cert(cert_req, pub, ca_key, ca_cert)  # type: ignore[arg-type]
        except ValueError as e:  # the csr asks for validity times or names no cert can carry
            raise RpcError(f"invalid csr: {e}") from e
        return pb.SignCertResponse(certificate_chain=[cert_pem(leaf), cert_pem(ca_cert), k.ca_pem])


#: methods callable with GET: public, read-only (key release and signing are POST only)
KMS_GET_METHODS = frozenset({"GetMeta", "GetTempCaCert", "GetAppEnvEncryptPubKey"})


def kms_service(state: KmsState) -> PrpcService:
    return PrpcService(
        KMS, KmsService(state), prefix="/prpc/", trim="KMS.", get_methods=KMS_GET_METHODS
    )


__all__ = ["KMS_GET_METHODS", "KmsService", "KmsState", "dataclasses", "kms_service"]
