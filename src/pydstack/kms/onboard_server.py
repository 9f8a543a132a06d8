"""onboard mode: a plain-HTTP page and `Onboard` service for a KMS that has no keys yet.

`Bootstrap{domain}` generates the root keys (attested: report_data = keccak256(
"dstack-kms-genereted-keys-v1:" || hex(ca SPKI) || ";" || hex(k256 pubkey) || ";") padded to 64
bytes — the typo is upstream's wire format); `Onboard{source_url, domain}` replicates them from
another KMS; `GetAttestationInfo` shows what to register on-chain or in an allowlist first;
`Finish` (or `GET /finish`) leaves onboard mode and starts the main service.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import re

from aiohttp import web
from google.protobuf.empty_pb2 import Empty

from pydstack.attest.attestation import decode_versioned
from pydstack.crypto.certs import spki_der
from pydstack.crypto.k256 import keccak256
from pydstack.rpc.proto import kms_rpc_pb2 as pb
from pydstack.rpc.server import (
    CallContext,
    PrpcServer,
    PrpcService,
    RequestGuard,
    RpcError,
    ServerLimits,
)

from .attestation import AttestationChecker
from .auth import AuthBackend
from .keys import KeyStore
from .onboard import agent_attest, agent_vm_config, onboard, ratls_attestation

log = logging.getLogger(__name__)
ONBOARD = pb.DESCRIPTOR.services_by_name["Onboard"]
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:56em}}code{{word-break:break-all}}
input{{width:28em}}section{{margin:1.5em 0}}</style></head><body>
<h1>{title}</h1>
<section><h2>Attestation</h2><pre id="info">loading...</pre></section>
<section><h2>Bootstrap a new KMS</h2><input id="domain" placeholder="kms domain">
<button id="bootstrap">Bootstrap</button></section>
<section><h2>Onboard from an existing KMS</h2><input id="source" placeholder="https://source-kms:8000">
<input id="domain2" placeholder="this kms domain"><button id="onboard">Onboard</button></section>
<pre id="result"></pre><button id="finish">Finish setup</button>
<script>
async function rpc(m, body) {{
  const r = await fetch('/prpc/Onboard.' + m + '?json', {{method: 'POST',
    headers: {{'Content-Type': 'application/json'}}, body: JSON.stringify(body || {{}})}});
  const j = await r.json(); if (!r.ok) throw new Error(j.error); return j;
}}
const show = (x) => document.getElementById('result').textContent = x;
rpc('GetAttestationInfo').then((i) => document.getElementById('info').textContent =
  JSON.stringify(i, null, 2)).catch((e) => document.getElementById('info').textContent = e);
document.getElementById('bootstrap').onclick = () => rpc('Bootstrap',
  {{domain: document.getElementById('domain').value}}).then((r) => show(JSON.stringify({{
  caPubkey: '0x' + r.ca_pubkey, k256Pubkey: '0x' + r.k256_pubkey,
  attestation: '0x' + r.attestation}}, null, 2))).catch((e) => show('error: ' + e.message));
document.getElementById('onboard').onclick = () => rpc('Onboard', {{
  source_url: document.getElementById('source').value + '/prpc',
  domain: document.getElementById('domain2').value}}).then((r) =>
  show('onboarded, k256 pubkey 0x' + r.k256_pubkey)).catch((e) => show('error: ' + e.message));
document.getElementById('finish').onclick = () => fetch('/finish').then(() => show('finished'));
</script></body></html>"""


def validate_domain(domain: str) -> None:
    if not domain or len(domain) > 253 or not domain.isascii():
        raise RpcError("invalid domain")
    if not all(_LABEL.match(label) for label in domain.split(".")):
        raise RpcError("invalid domain")


def keys_report_data(ca_spki: bytes, k256_pub: bytes) -> bytes:
    text = f"dstack-kms-genereted-keys-v1:{ca_spki.hex()};{k256_pub.hex()};"
    return keccak256(text.encode()).ljust(64, b"\0")


class OnboardService:
    def __init__(
        self,
        store: KeyStore,
        *,
        agent: str,
        checker: AttestationChecker,
        auth: AuthBackend,
        attest_rpc_cert: bool,
        site_name: str,
        done: asyncio.Event,
    ) -> None:
        self.store, self.agent, self.checker, self.auth = store, agent, checker, auth
        self.attest_rpc_cert, self.site_name, self.done = attest_rpc_cert, site_name, done
        self.lock = asyncio.Lock()

    async def _self_allowed(self) -> None:
        att = decode_versioned(await asyncio.to_thread(agent_attest, self.agent, bytes(64)))
        boot = await self.checker.boot_info(att)
        decision = await self.auth.is_kms_allowed(boot)
        if not decision.is_allowed:
            identity = boot.kms_identity()
            log.error("the auth backend denies this kms: %s (%s)", decision.reason, identity)
            raise RpcError(f"KMS is not allowed to bootstrap: {decision.reason} ({identity})")

    async def Bootstrap(self, req: pb.BootstrapRequest, ctx: CallContext) -> pb.BootstrapResponse:
        validate_domain(req.domain)
        async with self.lock:
            if self.store.any_root() or (self.store.dir / "bootstrap-info.json").exists():
                raise RpcError("KMS has already been bootstrapped")
            await self._self_allowed()
            agent = self.agent
            attest = (lambda spki: ratls_attestation(agent, spki)) if self.attest_rpc_cert else None
            keys = await asyncio.to_thread(self.store.generate, req.domain, attest)
            ca_spki = spki_der(keys.root_ca_cert.public_key())  # type: ignore[arg-type]
            rd = keys_report_data(ca_spki, keys.k256_pubkey)
            attestation = await asyncio.to_thread(agent_attest, self.agent, rd)
            info = {
                "ca_pubkey": ca_spki.hex(),
                "k256_pubkey": keys.k256_pubkey.hex(),
                "attestation": attestation.hex(),
            }
            (self.store.dir / "bootstrap-info.json").write_text(json.dumps(info))
        log.info("bootstrapped kms keys for %s", req.domain)
        return pb.BootstrapResponse(
            ca_pubkey=ca_spki, k256_pubkey=keys.k256_pubkey, attestation=attestation
        )

    async def Onboard(self, req: pb.OnboardRequest, ctx: CallContext) -> pb.OnboardResponse:
        validate_domain(req.domain)
        async with self.lock:
            try:
                keys = await onboard(
                    req.source_url,
                    self.store,
                    req.domain,
                    agent=self.agent,
                    checker=self.checker,
                    auth=self.auth,
                    attest_rpc_cert=self.attest_rpc_cert,
                )
            except ValueError as e:
                raise RpcError(str(e)) from e
        return pb.OnboardResponse(k256_pubkey=keys.k256_pubkey)

    async def GetAttestationInfo(self, req: Empty, ctx: CallContext) -> pb.AttestationInfoResponse:
        att = decode_versioned(await asyncio.to_thread(agent_attest, self.agent, bytes(64)))
        vm_config = await asyncio.to_thread(agent_vm_config, self.agent)
        boot = await self.checker.boot_info(att, vm_config=vm_config)
        info: dict[str, object] = {}
        try:
            info = await self.auth.info()
        except Exception as e:  # chain info is a convenience here
            log.info("auth api info unavailable: %s", e)
        return pb.AttestationInfoResponse(
            device_id=boot.device_id,
            mr_aggregated=boot.mr_aggregated,
            os_image_hash=boot.os_image_hash,
            tee_variant=boot.tee_variant,
            site_name=self.site_name,
            eth_rpc_url=str(info.get("ethRpcUrl", "")),
            kms_contract_address=str(info.get("kmsContractAddr", "")),
        )

    async def Finish(self, req: Empty, ctx: CallContext) -> Empty:
        self.done.set()
        return Empty()


async def run_onboard(
    host: str,
    port: int,
    service: OnboardService,
    title: str = "dstack KMS Setup",
    *,
    limits: ServerLimits | None = None,
    guard: RequestGuard | None = None,
) -> int:
    """serve onboard mode until Finish; returns after the listener is closed."""
    server = PrpcServer(limits=limits, guard=guard)
    server.mount(
        PrpcService(
            ONBOARD,
            service,
            prefix="/prpc/",
            trim="Onboard.",
            get_methods=frozenset({"GetAttestationInfo"}),
        )
    )

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE.format(title=html.escape(title)), content_type="text/html")

    async def finish(_: web.Request) -> web.Response:
        service.done.set()
        return web.Response(text="OK")

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="OK")

    server.app.router.add_get("/", page)
    server.app.router.add_get("/finish", finish)
    server.app.router.add_get("/health", health)
    bound = await server.listen_tcp(host, port)
    print(f"dstack-kms onboard mode on http://{host}:{bound}", flush=True)
    try:
        await service.done.wait()
    finally:
        await server.close()
    return bound
