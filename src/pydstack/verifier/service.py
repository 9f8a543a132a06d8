"""the verifier's HTTP API (upstream's): `POST /verify` and `GET /health`.

`POST /verify` takes `{"attestation": hex}` or `{"quote": hex, "event_log": "<json>",
"vm_config": "<json>"}` (a GetQuote response as is) and answers 200 with `{is_valid, details,
reason}` whatever the evidence is: bad input is `is_valid: false` with the reason. A body over
the size limit is 413 with the same shape; a body that is not JSON is 400 with it. Any content
type is taken (upstream's README posts with `curl -d`); the request guard still refuses
cross-site browser requests. `GET /health` is `{"status": "ok", "service": "dstack-verifier"}`.

The service runs on the lean :class:`~pydstack.rpc.http1.Http1Server` (connection limits,
request guard, bounded parsing) on uvloop, without prpc services.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydstack.attest.errors import VerifyError
from pydstack.attest.evidence import EvidenceVerifier, Verification
from pydstack.attest.verify import CollateralCache
from pydstack.errors import ConfigError
from pydstack.mr.store import ImageStore
from pydstack.mr.verify import OsImageVerifier
from pydstack.rpc.calls import Answer
from pydstack.rpc.http1 import Http1Server, HttpRequest
from pydstack.types import jsonlimits

from .config import VerifierConfig

log = logging.getLogger(__name__)

SERVICE = "dstack-verifier"
#: a 10 MiB attestation in hex with room for the JSON around it
MAX_BODY = 24 * 1024 * 1024
JSON = "application/json"
HEALTH = json.dumps({"status": "ok", "service": SERVICE}).encode()


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


def _refusal(reason: str, status: int) -> Answer:
    """an answer in /verify's shape for a request that cannot be verified at all (also the
    server's answer to requests it refuses before any route: too large, malformed, 404)."""
    v = Verification()
    v.fail("request", reason)
    return Answer(status, v.to_json_bytes(), JSON)


class VerifierService:
    def __init__(self, verifier: EvidenceVerifier, *, max_body: int = MAX_BODY) -> None:
        self.verifier = verifier
        self.max_body = max_body
        self.requests = 0

    async def verify(self, request: HttpRequest) -> Answer:
        self.requests += 1
        try:
            doc: Any = jsonlimits.loads(request.body, max_bytes=self.max_body)
        except ValueError as e:
            return _refusal(f"request is not valid json: {e}", 400)
        result = await self.verifier.verify_request(doc)
        if not result.is_valid:
            log.info("verification refused: %s", result.reason)
        return Answer(200, result.to_json_bytes(), JSON)

    async def health(self, _: HttpRequest) -> Answer:
        return Answer(200, HEALTH, JSON)

    def mount(self, server: Http1Server) -> None:
        server.route("POST", "/verify", self.verify)
        server.route("GET", "/health", self.health)


def make_server(
    cfg: VerifierConfig, verifier: EvidenceVerifier
) -> tuple[Http1Server, VerifierService]:
    """the verifier's server: the lean HTTP/1.1 server (bodies over MAX_BODY refused from their
    length with 413 in /verify's shape), the config's limits and browser rules."""
    server = Http1Server(
        max_body=MAX_BODY,
        response_headers={"X-App-Version": SERVICE},
        limits=cfg.server_limits,
        guard=cfg.guard(),
        route_error=_refusal,
    )
    service = VerifierService(verifier)
    service.mount(server)
    return server, service
