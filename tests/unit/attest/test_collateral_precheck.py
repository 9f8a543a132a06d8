"""collateral is looked up only for quotes whose own signatures verify, and the cache neither
serializes lookups behind fetches nor fetches one FMSPC twice at once nor too many at once.

The PCCS here is a real HTTP server in the test's event loop whose TCB info answers wait behind
an asyncio.Event (the gate); nothing waits on time.
"""

from __future__ import annotations

import asyncio
import hashlib
import urllib.parse

import dcap_qvl
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from pydstack.attest import verify
from pydstack.attest.errors import VerifyError
from pydstack.attest.quote import QuoteHeader, TdReport, build_quote, parse_quote
from pydstack.attest.verify import CollateralCache, precheck_quote, verify_quote
from pydstack.tee.collateral import SignedCollateral
from pydstack.tee.mockpki import MockPki, PlatformTcb
from pydstack.tee.simulated import SimulatedTdx

SEED = bytes.fromhex("c3" * 32)
ATTACKER_SEED = bytes.fromhex("d4" * 32)


def platform_td(n: int, seed: bytes = SEED) -> SimulatedTdx:
    """a TD of `seed` on its own platform: FMSPC 00906ED500nn, same root as every other."""
    fmspc = bytes.fromhex(f"00906ED500{n:02X}")
    ppid = hashlib.sha256(bytes([n]) + seed).digest()[:16]
    return SimulatedTdx(seed, platform=PlatformTcb(ppid=ppid, fmspc=fmspc))


def fmspc_of(tdx: SimulatedTdx) -> str:
    return tdx.pki.platform.fmspc.hex().upper()


class GatedPccs:
    """a PCCS for several platforms of one mock PKI; TCB info waits until `gate` is set."""

    def __init__(self, tds: list[SimulatedTdx]) -> None:
        self.collateral: dict[str, SignedCollateral] = {fmspc_of(t): t.collateral() for t in tds}
        self.any = next(iter(self.collateral.values()))
        self.gate = asyncio.Event()
        self.requests: list[str] = []
        self.tcb_requests: list[str] = []
        self.changed = asyncio.Condition()
        self.runner: web.AppRunner | None = None

    async def _seen(self, path: str, fmspc: str | None = None) -> None:
        async with self.changed:
            self.requests.append(path)
            if fmspc is not None:
                self.tcb_requests.append(fmspc)
            self.changed.notify_all()

    async def wait_for_tcb_requests(self, *fmspcs: str) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: all(f in self.tcb_requests for f in fmspcs))

    async def wait_for_tcb_count(self, n: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: len(self.tcb_requests) >= n)

    async def start(self) -> str:
        def chain(pem: str) -> str:
            return urllib.parse.quote(pem, safe="")

        async def pckcrl(request: web.Request) -> web.Response:
            await self._seen(request.path)
            return web.Response(
                body=self.any.pck_crl,
                headers={"SGX-PCK-CRL-Issuer-Chain": chain(self.any.pck_crl_issuer_chain)},
            )

        async def rootcacrl(request: web.Request) -> web.Response:
            await self._seen(request.path)
            return web.Response(text=self.any.root_ca_crl.hex())

        async def tcb(request: web.Request) -> web.Response:
            fmspc = request.query.get("fmspc", "").upper()
            await self._seen(request.path, fmspc)
            await self.gate.wait()
            col = self.collateral.get(fmspc)
            if col is None:
                return web.Response(status=404)
            return web.Response(
                text=f'{{"tcbInfo":{col.tcb_info},"signature":"{col.tcb_info_signature.hex()}"}}',
                content_type="application/json",
                headers={"TCB-Info-Issuer-Chain": chain(col.tcb_info_issuer_chain)},
            )

        async def qe_identity(request: web.Request) -> web.Response:
            await self._seen(request.path)
            body = (
                f'{{"enclaveIdentity":{self.any.qe_identity},'
                f'"signature":"{self.any.qe_identity_signature.hex()}"}}'
            )
            return web.Response(
                text=body,
                content_type="application/json",
                headers={
                    "SGX-Enclave-Identity-Issuer-Chain": chain(self.any.tcb_info_issuer_chain)
                },
            )

        app = web.Application()
        app.router.add_get("/sgx/certification/v4/pckcrl", pckcrl)
        app.router.add_get("/sgx/certification/v4/rootcacrl", rootcacrl)
        app.router.add_get("/tdx/certification/v4/tcb", tcb)
        app.router.add_get("/tdx/certification/v4/qe/identity", qe_identity)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        self.gate.set()
        if self.runner is not None:
            await self.runner.cleanup()


async def _yield_loop(times: int = 50) -> None:
    """let every runnable task take its steps (a count of loop turns, not a duration)."""
    for _ in range(times):
        await asyncio.sleep(0)


def rebuild(quote: bytes, **change: bytes) -> bytes:
    """`quote` with some of its auth data replaced (the signature over header and body kept
    unless `signature` is given)."""
    q = parse_quote(quote)
    assert q.td_report is not None
    parts = {
        "signature": q.ecdsa_signature,
        "attestation_key": q.attestation_key,
        "qe_report": q.qe_report_raw,
        "qe_report_signature": q.qe_report_signature,
        "qe_auth_data": q.qe_auth_data,
        "pck_cert_chain_pem": q.pck_cert_chain_pem,
    } | change
    signature = parts.pop("signature")
    return build_quote(
        QuoteHeader.parse(quote),
        TdReport.parse(quote[48:]),
        sign=lambda _: signature,
        **parts,
    )


def flip(data: bytes) -> bytes:
    return bytes([data[0] ^ 1]) + data[1:]


@pytest.fixture
async def pccs():
    server = GatedPccs([platform_td(n) for n in range(1, 7)])
    url = await server.start()
    yield server, url
    await server.stop()


def test_precheck_accepts_genuine_quotes(vectors):
    tdx = platform_td(1)
    assert precheck_quote(tdx.get_quote(b"x"), tdx.root_ca_der) == "00906ED50001"
    real = (vectors / "dcap-qvl/tdx_quote").read_bytes()
    assert precheck_quote(real) == "B0C06F000000"  # under Intel's root, the default
    assert precheck_quote((vectors / "dcap-qvl/tdx_quote_outdated").read_bytes()) == (
        "90C06F000000"
    )
    with pytest.raises(VerifyError, match="does not end in the configured root ca"):
        precheck_quote(real, tdx.root_ca_der)


def _leaf_named_like(attacker: MockPki, genuine: MockPki) -> x509.Certificate:
    """the attacker's pck leaf, re-signed by the attacker but naming the genuine ca as issuer."""
    leaf = attacker.pck_cert
    builder = (
        x509.CertificateBuilder()
        .subject_name(leaf.subject)
        .issuer_name(genuine.pck_ca_cert.subject)
        .public_key(genuine.pck_key.public_key())
        .serial_number(leaf.serial_number)
        .not_valid_before(leaf.not_valid_before_utc)
        .not_valid_after(leaf.not_valid_after_utc)
    )
    for ext in leaf.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    return builder.sign(attacker.pck_ca_key, hashes.SHA256())


def forged_quotes() -> list[tuple[str, bytes, str]]:
    genuine_td = platform_td(1)
    genuine = genuine_td.get_quote(b"genuine")
    q = parse_quote(genuine)
    attacker = MockPki(ATTACKER_SEED, PlatformTcb(fmspc=bytes.fromhex("0123456789AB")))
    # the attacker's own pck ca and leaf (random fmspc), ending in the genuine root
    spliced = (
        attacker.pem(attacker.pck_cert, attacker.pck_ca_cert)
        + MockPki(SEED).pem(MockPki(SEED).root_cert)
    ).encode()
    genuine_pki = MockPki(SEED)
    # the attacker's leaf (issuer name copied from the genuine ca) under the genuine ca and root
    leaf_spliced = (
        genuine_pki.pem(_leaf_named_like(attacker, genuine_pki), genuine_pki.pck_ca_cert)
        + genuine_pki.pem(genuine_pki.root_cert)
    ).encode()
    return [
        (
            "a whole quote under another pki",
            SimulatedTdx(ATTACKER_SEED, platform=attacker.platform).get_quote(b"forged"),
            "does not end in the configured root ca",
        ),
        (
            "a pck chain not signed by the root",
            rebuild(genuine, pck_cert_chain_pem=spliced),
            "pck ca certificate is not signed by the configured root ca",
        ),
        (
            "a pck leaf not signed by the pck ca",
            rebuild(genuine, pck_cert_chain_pem=leaf_spliced),
            "pck certificate is not signed by the pck ca",
        ),
        (
            "a two-certificate chain",
            rebuild(genuine, pck_cert_chain_pem=q.pck_cert_chain_pem.split(b"-----END")[0]),
            "pck certificate chain",
        ),
        (
            "a qe report not signed by the pck key",
            rebuild(genuine, qe_report_signature=flip(q.qe_report_signature)),
            "qe report signature does not verify",
        ),
        (
            "a qe report that does not bind the attestation key",
            rebuild(genuine, qe_auth_data=flip(q.qe_auth_data)),
            "qe report does not bind the attestation key",
        ),
        (
            "an unsigned quote",
            rebuild(genuine, signature=bytes(64)),
            "quote signature does not verify",
        ),
        (
            "a quote whose body was changed after signing",
            genuine[:200] + flip(genuine[200:]),
            "quote signature does not verify",
        ),
    ]


async def test_forged_quotes_are_refused_without_any_pccs_request(pccs):
    server, url = pccs
    server.gate.set()  # nothing should wait here; a request would simply be counted
    cache = CollateralCache(url)
    root = platform_td(1).root_ca_der
    for name, quote, reason in forged_quotes():
        with pytest.raises(VerifyError, match=reason):
            await cache.get(quote, root_ca_der=root)
        assert server.requests == [], name
    assert cache.fetches == 0
    # the same cache still fetches for a genuine quote
    tdx = platform_td(2)
    text = await cache.get(tdx.get_quote(b"ok"), root_ca_der=root)
    assert verify_quote(tdx.get_quote(b"ok"), text, root_ca_der=root).status == "UpToDate"
    assert server.tcb_requests == ["00906ED50002"]


async def test_a_cached_lookup_does_not_wait_for_other_fetches(pccs):
    server, url = pccs
    cached_td, slow_b, slow_c = platform_td(1), platform_td(2), platform_td(3)
    root = cached_td.root_ca_der
    cache = CollateralCache(url)
    cached = cached_td.collateral_json()
    cache.put(fmspc_of(cached_td), cached)
    fetches = [
        asyncio.create_task(cache.get(td.get_quote(b"slow"), root_ca_der=root))
        for td in (slow_b, slow_c)
    ]
    # one of them is held at the pccs (a cache that serialized lookups would hold the other back)
    await server.wait_for_tcb_count(1)
    lookup = asyncio.create_task(cache.get(cached_td.get_quote(b"fast"), root_ca_der=root))
    await _yield_loop()
    try:
        assert lookup.done() and not server.gate.is_set()
        assert not any(f.done() for f in fetches)  # the other fetches are still held
        assert lookup.result() == cached
    finally:
        server.gate.set()
        await asyncio.gather(*fetches, lookup, return_exceptions=True)
    assert all(not isinstance(r, BaseException) for r in [f.result() for f in fetches])


async def test_concurrent_lookups_of_one_fmspc_share_one_fetch(pccs):
    server, url = pccs
    tdx = platform_td(4)
    cache = CollateralCache(url)
    lookups = [
        asyncio.create_task(cache.get(tdx.get_quote(bytes([i])), root_ca_der=tdx.root_ca_der))
        for i in range(8)
    ]
    await server.wait_for_tcb_requests(fmspc_of(tdx))
    await _yield_loop()
    server.gate.set()
    results = await asyncio.gather(*lookups)
    assert len(set(results)) == 1
    assert server.tcb_requests == [fmspc_of(tdx)]
    assert cache.fetches == 1


async def test_a_failed_fetch_reaches_every_waiter_and_is_not_cached(pccs):
    server, url = pccs
    unknown = platform_td(9)  # the pccs has no tcb info for this platform
    cache = CollateralCache(url)
    quote = unknown.get_quote(b"")
    lookups = [
        asyncio.create_task(cache.get(quote, root_ca_der=unknown.root_ca_der)) for _ in range(3)
    ]
    await server.wait_for_tcb_requests(fmspc_of(unknown))
    server.gate.set()
    results = await asyncio.gather(*lookups, return_exceptions=True)
    assert all(isinstance(r, VerifyError) for r in results)
    assert "cannot fetch collateral for fmspc 00906ED50009" in str(results[0])
    assert url.split("//")[1] not in str(results[0])  # the pccs address stays in the log
    assert server.tcb_requests == [fmspc_of(unknown)]
    with pytest.raises(VerifyError):  # not cached: the next caller asks again
        await cache.get(quote, root_ca_der=unknown.root_ca_der)
    assert server.tcb_requests == [fmspc_of(unknown)] * 2


async def test_fetches_in_flight_are_bounded(pccs, monkeypatch):
    server, url = pccs
    real_fetch = dcap_qvl.get_collateral
    state = {"active": 0, "peak": 0}

    async def counting_fetch(pccs_url: str, quote: bytes) -> object:
        state["active"] += 1
        state["peak"] = max(state["peak"], state["active"])
        try:
            return await real_fetch(pccs_url, quote)
        finally:
            state["active"] -= 1

    monkeypatch.setattr(verify.dcap_qvl, "get_collateral", counting_fetch)
    tds = [platform_td(n) for n in range(1, 6)]
    cache = CollateralCache(url, max_fetches=2)
    lookups = [
        asyncio.create_task(cache.get(td.get_quote(b""), root_ca_der=td.root_ca_der)) for td in tds
    ]
    await _yield_loop()
    try:
        assert state["active"] == 2  # two fetches started, three wait for a slot
        await server.wait_for_tcb_count(2)  # both reached the pccs and are held there
        await _yield_loop()
        assert state["active"] == 2 and len(server.tcb_requests) == 2
    finally:
        server.gate.set()
        await asyncio.gather(*lookups, return_exceptions=True)
    assert all(not isinstance(t.result(), BaseException) for t in lookups)
    assert state["peak"] == 2
    assert sorted(server.tcb_requests) == sorted(fmspc_of(td) for td in tds)


def test_max_fetches_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        CollateralCache(None, max_fetches=0)
