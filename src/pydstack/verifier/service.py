"""the verifier's HTTP API (upstream's): `POST /verify` and `GET /health`.

`POST /verify` takes `{"attestation": hex}` or `{"quote": hex, "event_log": "<json>",
"vm_config": "<json>"}` (a GetQuote response as is) and answers 200 with `{is_valid, details,
reason}` whatever the evidence is: bad input is `is_valid: false` with the reason. A body over
the size limit is 413 with the same shape; a body that is not JSON is 400 with it. Any content
type is taken (upstream's README posts with `curl -d`); the request guard still refuses
cross-site browser requests. `GET /health` is `{"status": "ok", "service": "dstack-verifier"}`.

The service runs on :class:`PrpcServer`'s listeners (connection limits, request guard) without
prpc services.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from pydstack.attest.errors import VerifyError
from pydstack.attest.evidence import EvidenceVerifier, Verification
from pydstack.attest.verify import CollateralCache
from pydstack.errors import ConfigError
from pydstack.mr.store import ImageStore
from pydstack.mr.verify import OsImageVerifier
from pydstack.rpc.server import PrpcServer
from pydstack.types import jsonlimits

from .config import VerifierConfig

log = logging.getLogger(__name__)

SERVICE = "dstack-verifier"
#: a 10 MiB attestation in hex with room for the JSON around it
MAX_BODY = 24 * 1024 * 1024


def build_verifier(cfg: VerifierConfig) -> EvidenceVerifier:
    """the verification core for `cfg`: collateral (PCCS, disk cache, files), root, images;
    ConfigError when a collateral file or the root cannot be used."""
    collateral = CollateralCache(
        cfg.pccs_url or None, cfg.collateral_cache_dir, max_fetches=cfg.max_concurrent_fetches
    )
    for path in cfg.collateral_files:
        try:
            fmspc = collateral.load_file(path)
        except VerifyError as e:
            raise ConfigError(f"attestation.collateral_files: {e}") from e
        log.info("collateral for fmspc %s from %s", fmspc, path)
    root = cfg.root_ca_der()
    if root is not None:
        log.warning("accepting quotes under the external trust anchor %s", cfg.root_ca_tdx)
    store = ImageStore(cfg.image_cache_dir, cfg.image_download_url, cfg.image_download_timeout)
    return EvidenceVerifier(collateral, root_ca_der=root, images=OsImageVerifier(store))


def _refusal(status: int, reason: str) -> web.Response:
    v = Verification()
    v.fail("request", reason)
    return web.json_response(v.to_json_obj(), status=status)


class VerifierService:
    def __init__(self, verifier: EvidenceVerifier, *, max_body: int = MAX_BODY) -> None:
        self.verifier = verifier
        self.max_body = max_body
        self.requests = 0

    async def verify(self, request: web.Request) -> web.Response:
        self.requests += 1
        if request.content_length is not None and request.content_length > self.max_body:
            return _refusal(413, f"request body larger than {self.max_body} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _refusal(413, f"request body larger than {self.max_body} bytes")
        try:
            doc: Any = jsonlimits.loads(body, max_bytes=self.max_body)
        except ValueError as e:
            return _refusal(400, f"request is not valid json: {e}")
        result = await self.verifier.verify_request(doc)
        if not result.is_valid:
            log.info("verification refused: %s", result.reason)
        return web.json_response(result.to_json_obj())

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "service": SERVICE})

    def mount(self, server: PrpcServer) -> None:
        server.app.router.add_post("/verify", self.verify)
        server.app.router.add_get("/health", self.health)


def make_server(
    cfg: VerifierConfig, verifier: EvidenceVerifier
) -> tuple[PrpcServer, VerifierService]:
    server = PrpcServer(
        max_body=MAX_BODY,
        response_headers={"X-App-Version": SERVICE},
        limits=cfg.server_limits,
        guard=cfg.guard(),
    )
    service = VerifierService(verifier)
    service.mount(server)
    return server, service
