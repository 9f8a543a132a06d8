"""a local RFC 6962 log for tests and development: a real Merkle tree and signed tree heads.

``POST /ct/v1/add-chain`` (``{"chain": [base64 DER, ...]}``, leaf first) logs an x509 entry and
``POST /ct/v1/add-pre-chain`` (the precertificate, then its issuer...) a precert entry (issuer
key hash and the TBS without the poison extension), each answering a signed SCT;
``GET /ct/v1/get-sth`` signs the current tree head with the log's ECDSA P-256 key;
``GET /ct/v1/get-entries?start=&end=`` serves at most :attr:`DevCtLog.page` entries per answer.
:meth:`DevCtLog.tamper` makes it serve a different leaf at an index from then on (a log that
lies about its entries), for tests of the monitor's root check.
"""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pydstack.crypto.certload import load_cert_der

from .ctlog import (
    MAX_CERT,
    MAX_CHAIN,
    PRECERT_ENTRY,
    X509_ENTRY,
    CompactMerkleTree,
    CtError,
    LogEntry,
    encode_extra,
    encode_leaf,
    leaf_hash,
    sign_sct,
    sign_sth,
    strip_poison,
)

MAX_BODY = (MAX_CERT * 4 // 3 + 64) * MAX_CHAIN


class DevCtLog:
    """the log's entries, tree and key, and its aiohttp application."""

    def __init__(self, key: ec.EllipticCurvePrivateKey | None = None, *, page: int = 64) -> None:
        self.key = key or ec.generate_private_key(ec.SECP256R1())
        self.page = page
        self.leaves: list[bytes] = []
        self.extra: list[bytes] = []
        self.tree = CompactMerkleTree()
        self._served: dict[int, bytes] = {}
        self._runner: web.AppRunner | None = None

    def public_key_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def add(self, chain: list[bytes], *, precert: bool = False) -> dict[str, Any]:
        """logs `chain` (DER, leaf first); the SCT. CtError for an unparseable or empty chain,
        or a precert without its issuer."""
        if not chain or len(chain) > MAX_CHAIN:
            raise CtError(f"chain must hold 1-{MAX_CHAIN} certificates")
        try:
            certs = [load_cert_der(c) for c in chain]
        except ValueError as e:
            raise CtError(f"chain does not parse: {e}") from e
        ts = int(time.time() * 1000)
        if precert:
            if len(certs) < 2:
                raise CtError("a precert chain needs its issuer")
            issuer = (
                certs[1]
                .public_key()
                .public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
            tbs = strip_poison(certs[0].tbs_certificate_bytes)
            entry = LogEntry(ts, PRECERT_ENTRY, tbs, hashlib.sha256(issuer).digest())
        else:
            entry = LogEntry(ts, X509_ENTRY, chain[0])
        leaf = encode_leaf(entry)
        self.leaves.append(leaf)
        self.extra.append(encode_extra(entry.entry_type, chain))
        self.tree.append(leaf_hash(leaf))
        return sign_sct(self.key, entry)

    def tamper(self, index: int, leaf: bytes) -> None:
        self._served[index] = leaf

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/ct/v1/add-chain", self._add_chain)
        app.router.add_post("/ct/v1/add-pre-chain", self._add_pre_chain)
        app.router.add_get("/ct/v1/get-sth", self._get_sth)
        app.router.add_get("/ct/v1/get-entries", self._get_entries)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """serves on `host`:`port`; the log's base URL."""
        self._runner = web.AppRunner(self.app())
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        return f"http://{host}:{sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _chain(self, request: web.Request) -> list[bytes]:
        try:
            body = await request.json()
            chain = body["chain"]
            if not isinstance(chain, list):
                raise TypeError("chain must be a list")
            return [base64.b64decode(c, validate=True) for c in chain]
        except (ValueError, KeyError, TypeError) as e:
            raise web.HTTPBadRequest(text=f"bad chain: {e}") from e

    async def _add(self, request: web.Request, precert: bool) -> web.Response:
        chain = await self._chain(request)
        try:
            return web.json_response(self.add(chain, precert=precert))
        except CtError as e:
            raise web.HTTPBadRequest(text=str(e)) from e

    async def _add_chain(self, request: web.Request) -> web.Response:
        return await self._add(request, False)

    async def _add_pre_chain(self, request: web.Request) -> web.Response:
        return await self._add(request, True)

    async def _get_sth(self, _: web.Request) -> web.Response:
        sth = sign_sth(self.key, self.tree.size, int(time.time() * 1000), self.tree.root())
        return web.json_response(sth.to_json())

    async def _get_entries(self, request: web.Request) -> web.Response:
        try:
            start, end = int(request.query["start"]), int(request.query["end"])
        except (KeyError, ValueError) as e:
            raise web.HTTPBadRequest(text="start and end are required integers") from e
        if start < 0 or end < start or start >= len(self.leaves):
            raise web.HTTPBadRequest(text="start and end are out of range")
        end = min(end, len(self.leaves) - 1, start + self.page - 1)
        entries = [
            {
                "leaf_input": base64.b64encode(self._served.get(i, self.leaves[i])).decode(),
                "extra_data": base64.b64encode(self.extra[i]).decode(),
            }
            for i in range(start, end + 1)
        ]
        return web.json_response({"entries": entries})
