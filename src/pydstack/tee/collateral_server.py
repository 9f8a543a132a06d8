"""a PCCS-compatible HTTP server for the simulated TDX's collateral.

Serves the paths dcap-qvl's `get_collateral` asks for:
`/sgx/certification/v4/pckcrl?ca=platform&encoding=der` (DER body, header
`SGX-PCK-CRL-Issuer-Chain`), `/sgx/certification/v4/rootcacrl` (hex body),
`/tdx/certification/v4/tcb?fmspc=...` (`{"tcbInfo", "signature"}`, header
`TCB-Info-Issuer-Chain`) and `/tdx/certification/v4/qe/identity` (`{"enclaveIdentity",
"signature"}`, header `SGX-Enclave-Identity-Issuer-Chain`). Issuer chains are URL-encoded PEM.

Connections are bounded by :class:`ServerLimits` like every server's. It has no request guard:
it only serves public, read-only data, and verifiers name it by any host name.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import urllib.parse
from pathlib import Path

from aiohttp import web

from pydstack.rpc.aiolimits import LimitedRunner, LimitedSite
from pydstack.rpc.limits import ServerLimits
from pydstack.types.netaddr import parse_port

from .collateral import SignedCollateral
from .mockpki import MockPki

log = logging.getLogger(__name__)


def _chain(pem: str) -> str:
    return urllib.parse.quote(pem, safe="")


def make_app(collateral: SignedCollateral, fmspc: str) -> web.Application:
    """an aiohttp app serving `collateral` for the platform `fmspc`."""
    fmspc = fmspc.upper()

    async def pckcrl(request: web.Request) -> web.Response:
        if request.query.get("ca", "platform") not in ("platform", "processor"):
            return web.Response(status=400, text="unknown ca")
        return web.Response(
            body=collateral.pck_crl,
            content_type="application/pkix-crl",
            headers={"SGX-PCK-CRL-Issuer-Chain": _chain(collateral.pck_crl_issuer_chain)},
        )

    async def rootcacrl(_: web.Request) -> web.Response:
        return web.Response(text=collateral.root_ca_crl.hex())

    async def tcb(request: web.Request) -> web.Response:
        if request.query.get("fmspc", "").upper() != fmspc:
            return web.Response(status=404, text="no tcb info for this fmspc")
        body = (
            f'{{"tcbInfo":{collateral.tcb_info},'
            f'"signature":"{collateral.tcb_info_signature.hex()}"}}'
        )
        return web.Response(
            text=body,
            content_type="application/json",
            headers={"TCB-Info-Issuer-Chain": _chain(collateral.tcb_info_issuer_chain)},
        )

    async def qe_identity(_: web.Request) -> web.Response:
        body = (
            f'{{"enclaveIdentity":{collateral.qe_identity},'
            f'"signature":"{collateral.qe_identity_signature.hex()}"}}'
        )
        return web.Response(
            text=body,
            content_type="application/json",
            headers={"SGX-Enclave-Identity-Issuer-Chain": _chain(collateral.tcb_info_issuer_chain)},
        )

    app = web.Application()
    app.router.add_get("/sgx/certification/v4/pckcrl", pckcrl)
    app.router.add_get("/sgx/certification/v4/rootcacrl", rootcacrl)
    for tee in ("tdx", "sgx"):
        app.router.add_get(f"/{tee}/certification/v4/tcb", tcb)
        app.router.add_get(f"/{tee}/certification/v4/qe/identity", qe_identity)
    return app


async def start_server(
    collateral: SignedCollateral,
    fmspc: str,
    host: str = "127.0.0.1",
    port: int = 0,
    limits: ServerLimits | None = None,
) -> tuple[web.AppRunner, str]:
    """start serving; returns the runner (call `cleanup()` to stop) and the base URL."""
    runner = LimitedRunner(make_app(collateral, fmspc), limits or ServerLimits())
    await runner.setup()
    site = LimitedSite(runner, host=host, port=port)
    await site.start()
    return runner, f"http://{host}:{site.port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dstack-collateral-server",
        description="serve the simulated TDX's DCAP collateral on PCCS-compatible paths",
    )
    seeds = parser.add_mutually_exclusive_group(required=True)
    seeds.add_argument(
        "--seed", help="the 32-byte mock attestation seed (hex; visible to other local users)"
    )
    seeds.add_argument(
        "--seed-file", type=Path, help="a file holding the seed as hex (keep it 0600)"
    )
    parser.add_argument(
        "--listen", default="127.0.0.1:8088", help="host:port (default %(default)s)"
    )
    parser.add_argument("--root-out", type=Path, help="write the mock root CA (DER) here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        text = args.seed_file.read_text().strip() if args.seed_file else args.seed
        seed = bytes.fromhex(text.removeprefix("0x"))
        if len(seed) != 32:
            raise ValueError("the seed must be 32 bytes (64 hex digits)")
        pki = MockPki(seed)
    except OSError as e:
        print(f"error: cannot read the seed file: {e.strerror}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: invalid seed: {e}", file=sys.stderr)
        return 2
    host, _, port = args.listen.rpartition(":")
    if not host or parse_port(port, allow_zero=True) is None:
        print(f"error: --listen must be host:port, got {args.listen!r}", file=sys.stderr)
        return 2
    from .collateral import make_collateral

    collateral = make_collateral(pki)
    if args.root_out:
        args.root_out.write_bytes(pki.root_ca_der)

    async def run() -> None:
        runner, url = await start_server(collateral, pki.platform.fmspc.hex(), host, int(port))
        print(f"serving mock pccs collateral on {url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
