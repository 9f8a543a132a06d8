"""the Admin service's certificate methods (gateway notes §1.5) on :class:`~.zt_certs.ZtCerts`:
DNS credentials, ZT-domains, the certbot settings, the account rotation, CAA and the attested
key history — translations between upstream's messages and
:class:`~pydstack.certbot.admin.CertbotAdmin`.

Tokens and TSIG secrets never leave: every credential in an answer is redacted (upstream's first
4 + ``...`` + last 4 characters, all ``*`` up to 8). RFC 2136 credentials use the pydstack fields
``rfc2136_*`` (numbers 100-104, outside upstream's). Bad input is refused with a clear message
and changes nothing; a gateway without a certbot refuses every method ("the certbot is
disabled").
"""

from __future__ import annotations

import logging
from typing import Any

from google.protobuf.empty_pb2 import Empty

from pydstack.certbot.admin import CertbotAdmin
from pydstack.certbot.certbot import Outcome
from pydstack.certbot.errors import CertbotError
from pydstack.certbot.model import ZtDomainConfig
from pydstack.rpc.proto import gateway_rpc_pb2 as pb
from pydstack.rpc.server import CallContext, RpcError

from .zt_certs import ZtCerts

log = logging.getLogger(__name__)

#: proto field → CertbotAdmin's name, for rfc2136 credentials
RFC2136_FIELDS = {
    "rfc2136_server": "server",
    "rfc2136_tsig_key_name": "tsig_key_name",
    "rfc2136_tsig_secret": "tsig_secret",
    "rfc2136_tsig_algorithm": "tsig_algorithm",
    "rfc2136_zone": "zone",
}


def credential_message(info: dict[str, Any]) -> pb.DnsCredentialInfo:
    """``DnsCredentialInfo`` of :meth:`~pydstack.certbot.model.DnsCredential.info` (already
    redacted)."""
    msg = pb.DnsCredentialInfo(
        id=info["id"],
        name=info["name"],
        provider_type=info["provider_type"],
        cf_api_token=info.get("cf_api_token", ""),
        cf_api_url=info.get("cf_api_url", ""),
        dns_txt_ttl=int(info["dns_txt_ttl"]),
        max_dns_wait=int(info["max_dns_wait"]),
        created_at=int(info["created_at"]),
        updated_at=int(info["updated_at"]),
    )
    for field, key in RFC2136_FIELDS.items():
        setattr(msg, field, info.get(key, ""))
    return msg


def zt_config_message(config: dict[str, Any]) -> pb.ZtDomainConfig:
    msg = pb.ZtDomainConfig(domain=config["domain"], port=config["port"])
    msg.priority = config["priority"]
    if config.get("dns_cred_id"):
        msg.dns_cred_id = config["dns_cred_id"]
    if config.get("node") is not None:
        msg.node = config["node"]
    return msg


def zt_info_message(info: dict[str, Any]) -> pb.ZtDomainInfo:
    s = info["cert_status"]
    return pb.ZtDomainInfo(
        config=zt_config_message(info["config"]),
        cert_status=pb.ZtDomainCertStatus(
            has_cert=s["has_cert"],
            not_after=s["not_after"],
            issued_by=s["issued_by"],
            issued_at=s["issued_at"],
            loaded_in_memory=s["loaded_in_memory"],
        ),
    )


def zt_config_from_message(msg: pb.ZtDomainConfig) -> ZtDomainConfig:
    return ZtDomainConfig(
        domain=msg.domain,
        dns_cred_id=msg.dns_cred_id if msg.HasField("dns_cred_id") else None,
        port=msg.port,
        node=msg.node if msg.HasField("node") else None,
        priority=msg.priority,
    )


def _attestation_message(a: dict[str, Any]) -> pb.CertAttestationInfo:
    return pb.CertAttestationInfo(
        public_key=bytes.fromhex(a["public_key"]),
        quote=a["quote"],
        generated_by=a["generated_by"],
        generated_at=a["generated_at"],
    )


def _given(msg: Any, fields: dict[str, str]) -> dict[str, Any]:
    """CertbotAdmin's keyword arguments of the optional `fields` set in `msg`."""
    return {key: getattr(msg, f) for f, key in fields.items() if msg.HasField(f)}


class ZtAdminMethods:
    """the certificate methods of ``Admin``; the service sets :attr:`zt` (None: no certbot)."""

    zt: ZtCerts | None = None

    def _admin(self) -> tuple[ZtCerts, CertbotAdmin]:
        zt = self.zt
        if zt is None:
            raise RpcError("the certbot is disabled ([core.certbot] enabled = false)")
        return zt, CertbotAdmin(zt.storage, zt.interactive, loaded=zt.loaded)

    # ------------------------------------------------------------------ dns credentials

    async def ListDnsCredentials(
        self, req: Empty, call: CallContext
    ) -> pb.ListDnsCredentialsResponse:
        zt, admin = self._admin()
        resp = pb.ListDnsCredentialsResponse(
            credentials=[credential_message(c) for c in await admin.list_dns_credentials()]
        )
        default = await zt.storage.get_default_dns_credential()
        if default:
            resp.default_id = default
        return resp

    async def GetDnsCredential(
        self, req: pb.GetDnsCredentialRequest, call: CallContext
    ) -> pb.DnsCredentialInfo:
        _, admin = self._admin()
        return credential_message(await admin.get_dns_credential(req.id))

    async def CreateDnsCredential(
        self, req: pb.CreateDnsCredentialRequest, call: CallContext
    ) -> pb.DnsCredentialInfo:
        _, admin = self._admin()
        fields = _given(req, RFC2136_FIELDS | {"cf_api_url": "cf_api_url"})
        if req.cf_api_token:
            fields["cf_api_token"] = req.cf_api_token
        info = await admin.create_dns_credential(
            req.name,
            req.provider_type,
            set_as_default=req.set_as_default,
            dns_txt_ttl=req.dns_txt_ttl if req.HasField("dns_txt_ttl") else None,
            max_dns_wait=req.max_dns_wait if req.HasField("max_dns_wait") else None,
            **fields,
        )
        log.info("created the %s dns credential %s", info["provider_type"], info["id"])
        return credential_message(info)

    async def UpdateDnsCredential(
        self, req: pb.UpdateDnsCredentialRequest, call: CallContext
    ) -> pb.DnsCredentialInfo:
        _, admin = self._admin()
        fields = _given(
            req, RFC2136_FIELDS | {"cf_api_token": "cf_api_token", "cf_api_url": "cf_api_url"}
        )
        name = req.name if req.HasField("name") else None
        return credential_message(await admin.update_dns_credential(req.id, name=name, **fields))

    async def DeleteDnsCredential(
        self, req: pb.DeleteDnsCredentialRequest, call: CallContext
    ) -> Empty:
        _, admin = self._admin()
        await admin.delete_dns_credential(req.id)
        return Empty()

    async def GetDefaultDnsCredential(
        self, req: Empty, call: CallContext
    ) -> pb.GetDefaultDnsCredentialResponse:
        zt, admin = self._admin()
        resp = pb.GetDefaultDnsCredentialResponse(
            default_id=await zt.storage.get_default_dns_credential() or ""
        )
        info = await admin.get_default_dns_credential()
        if info is not None:
            resp.credential.CopyFrom(credential_message(info))
        return resp

    async def SetDefaultDnsCredential(
        self, req: pb.SetDefaultDnsCredentialRequest, call: CallContext
    ) -> Empty:
        _, admin = self._admin()
        await admin.set_default_dns_credential(req.id)
        return Empty()

    # ------------------------------------------------------------------ zt-domains

    async def ListZtDomains(self, req: Empty, call: CallContext) -> pb.ListZtDomainsResponse:
        _, admin = self._admin()
        return pb.ListZtDomainsResponse(
            domains=[zt_info_message(d) for d in await admin.list_zt_domains()]
        )

    async def GetZtDomain(self, req: pb.GetZtDomainRequest, call: CallContext) -> pb.ZtDomainInfo:
        _, admin = self._admin()
        return zt_info_message(await admin.get_zt_domain(req.domain))

    async def AddZtDomain(self, req: pb.ZtDomainConfig, call: CallContext) -> pb.ZtDomainInfo:
        zt, admin = self._admin()
        info = await admin.add_zt_domain(zt_config_from_message(req))
        log.info("added the zt-domain %s", info["config"]["domain"])
        zt.kick()
        return zt_info_message(info)

    async def UpdateZtDomain(self, req: pb.ZtDomainConfig, call: CallContext) -> pb.ZtDomainInfo:
        zt, admin = self._admin()
        info = await admin.update_zt_domain(zt_config_from_message(req))
        zt.kick()
        return zt_info_message(info)

    async def DeleteZtDomain(self, req: pb.DeleteZtDomainRequest, call: CallContext) -> Empty:
        zt, admin = self._admin()
        await admin.delete_zt_domain(req.domain)
        zt.kick()
        return Empty()

    async def RenewZtDomainCert(
        self, req: pb.RenewZtDomainCertRequest, call: CallContext
    ) -> pb.RenewZtDomainCertResponse:
        zt, admin = self._admin()
        try:
            out = await admin.renew_zt_domain_cert(req.domain, force=req.force)
        finally:
            await zt.sync()
        return pb.RenewZtDomainCertResponse(renewed=out["renewed"], not_after=out["not_after"])

    async def ForceReleaseCertLock(
        self, req: pb.ForceReleaseCertLockRequest, call: CallContext
    ) -> Empty:
        _, admin = self._admin()
        await admin.force_release_cert_lock(req.domain)
        return Empty()

    async def ListCertAttestations(
        self, req: pb.ListCertAttestationsRequest, call: CallContext
    ) -> pb.ListCertAttestationsResponse:
        _, admin = self._admin()
        out = await admin.list_cert_attestations(req.domain, req.limit)
        resp = pb.ListCertAttestationsResponse(
            history=[_attestation_message(a) for a in out["history"]]
        )
        if out["latest"] is not None:
            resp.latest.CopyFrom(_attestation_message(out["latest"]))
        return resp

    async def RenewCert(self, req: Empty, call: CallContext) -> pb.RenewCertResponse:
        """upstream: a forced renewal of every ZT-domain (one attempt each)."""
        zt, _ = self._admin()
        try:
            results = await zt.interactive.renew_all(force=True)
        finally:
            await zt.sync()
        errors = {d: r for d, r in results.items() if isinstance(r, CertbotError)}
        if errors and len(errors) == len(results):
            raise RpcError("; ".join(f"{d}: {e}" for d, e in sorted(errors.items())))
        return pb.RenewCertResponse(renewed=any(r is Outcome.RENEWED for r in results.values()))

    async def SetCaa(self, req: Empty, call: CallContext) -> Empty:
        zt, _ = self._admin()
        failed = await zt.certbot.set_caa_all()
        if failed:
            raise RpcError("; ".join(f"{d}: {e}" for d, e in sorted(failed.items())))
        return Empty()

    # ------------------------------------------------------------------ settings, account

    async def GetCertbotConfig(self, req: Empty, call: CallContext) -> pb.CertbotConfigResponse:
        zt, admin = self._admin()
        out = await admin.get_certbot_config()
        settings = await zt.storage.get_settings()
        return pb.CertbotConfigResponse(**out, caa_issuer=settings.caa_issuer)

    async def SetCertbotConfig(self, req: pb.SetCertbotConfigRequest, call: CallContext) -> Empty:
        zt, admin = self._admin()
        names = (
            "renew_interval_secs",
            "renew_before_expiration_secs",
            "renew_timeout_secs",
            "acme_url",
            "caa_issuer",
        )
        await admin.set_certbot_config(**_given(req, {n: n for n in names}))
        zt.kick()
        return Empty()

    async def RotateAcmeCredentials(
        self, req: Empty, call: CallContext
    ) -> pb.RotateAcmeCredentialsResponse:
        zt, admin = self._admin()
        out = await admin.rotate_acme_credentials()
        await zt.sync()
        log.info("rotated the acme account to %s", out["account_uri"])
        return pb.RotateAcmeCredentialsResponse(
            account_uri=out["account_uri"],
            domains_updated=len(out["domains_updated"]),
            domains_failed=out["domains_failed"],
        )
