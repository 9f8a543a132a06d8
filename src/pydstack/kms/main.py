"""`dstack-kms -c kms.toml`: the key management service."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from pydstack.attest.verify import CollateralCache
from pydstack.crypto.certs import cert_pem, key_pem
from pydstack.errors import ConfigError, DstackError
from pydstack.mr.store import ImageStore
from pydstack.mr.verify import OsImageVerifier
from pydstack.rpc.calls import Answer
from pydstack.rpc.http1 import Http1Server, HttpRequest

from .admin import admin_server, admin_token
from .attestation import AttestationChecker
from .auth import AuthBackend, DevAuth, SimpleAuth, WebhookAuth
from .config import KmsConfig
from .keys import KeyStore
from .onboard import onboard, ratls_attestation
from .onboard_server import OnboardService, run_onboard
from .service import KmsState, SelfNotAllowed, kms_service

TEXT = "text/plain; charset=utf-8"

log = logging.getLogger("dstack-kms")


def make_auth(cfg: KmsConfig) -> AuthBackend:
    if cfg.auth_type == "dev":
        return DevAuth(cfg.dev_gateway_app_id)
    if cfg.auth_type == "eth":
        from .auth import EthAuth

        return EthAuth(cfg.eth_rpc_url, cfg.eth_kms_contract, cfg.eth_chain_id)
    if cfg.auth_type == "simple":
        assert cfg.simple_config is not None
        return SimpleAuth(cfg.simple_config)
    return WebhookAuth(cfg.webhook_url)


async def make_state(cfg: KmsConfig) -> KmsState:
    store = KeyStore(cfg.cert_dir)
    root = cfg.root_ca_tdx.read_bytes() if cfg.root_ca_tdx else None
    if root is not None:
        log.warning("accepting quotes under the external trust anchor %s", cfg.root_ca_tdx)
    collateral = CollateralCache(
        cfg.pccs_url, cfg.collateral_cache_dir, max_fetches=cfg.max_concurrent_fetches
    )
    images = None
    if cfg.image_verify:
        images = OsImageVerifier(
            ImageStore(cfg.image_cache_dir, cfg.image_download_url, cfg.image_download_timeout)
        )
        log.info("verifying os images (image cache %s)", cfg.image_cache_dir)
    else:
        log.warning("core.image.verify is false: os_image_hash is the caller's claim")
    checker = AttestationChecker(collateral, root, images)
    auth = make_auth(cfg)
    try:
        return await _keys_and_state(cfg, store, checker, auth)
    except BaseException:
        await auth.close()  # a kms that does not start leaves no connection behind
        raise


async def _keys_and_state(
    cfg: KmsConfig, store: KeyStore, checker: AttestationChecker, auth: AuthBackend
) -> KmsState:
    """the keys (onboarded, bootstrapped or loaded) and the state serving them, once this KMS
    is allowed to serve."""
    if not store.exists():
        attest = (
            (lambda spki: ratls_attestation(cfg.guest_agent, spki)) if cfg.attest_rpc_cert else None
        )
        if cfg.onboard_source_url:
            if not cfg.auto_bootstrap_domain:
                raise ConfigError(
                    "onboarding needs core.onboard.auto_bootstrap_domain (this kms's domain)"
                )
            log.info("onboarding from %s", cfg.onboard_source_url)
            await onboard(
                cfg.onboard_source_url,
                store,
                cfg.auto_bootstrap_domain,
                agent=cfg.guest_agent,
                checker=checker,
                auth=auth,
                attest_rpc_cert=cfg.attest_rpc_cert,
            )
        elif cfg.auto_bootstrap_domain:
            log.info("bootstrapping new root keys for %s", cfg.auto_bootstrap_domain)
            store.generate(cfg.auto_bootstrap_domain, attest)
        elif cfg.onboard_enabled:
            done = asyncio.Event()
            service = OnboardService(
                store,
                agent=cfg.guest_agent,
                checker=checker,
                auth=auth,
                attest_rpc_cert=cfg.attest_rpc_cert,
                site_name=cfg.site_name,
                done=done,
            )
            await run_onboard(
                cfg.onboard_address,
                cfg.onboard_port,
                service,
                cfg.site_name or "dstack KMS Setup",
                limits=cfg.server_limits,
                guard=cfg.guard(),
            )
            if not store.exists():
                raise ConfigError("failed to onboard: no keys after onboard mode finished")
        else:
            raise ConfigError(
                f"kms keys missing in {cfg.cert_dir} and core.onboard.enabled is false"
            )
    state = KmsState(
        keys=store.load(),
        auth=auth,
        checker=checker,
        cert_dir=cfg.cert_dir,
        key_epoch=cfg.key_epoch,
        enforce_self_authorization=cfg.enforce_self_authorization,
        guest_agent=cfg.guest_agent,
    )
    await state.ensure_self_allowed()
    return state


async def start(cfg: KmsConfig, state: KmsState) -> tuple[Http1Server, int]:
    """the KMS's RPC listener: HTTPS with optional client certificates (RA-TLS), `/health` and
    `/metrics` beside the prpc methods."""
    server = Http1Server(
        response_headers={"X-App-Version": "pydstack-kms"},
        limits=cfg.server_limits,
        guard=cfg.guard(),
    )
    server.mount(kms_service(state))

    async def health(_: HttpRequest) -> Answer:
        return Answer(200, b"OK", TEXT)

    async def metrics(_: HttpRequest) -> Answer:
        if not cfg.metrics_enabled:
            return Answer(404, b"metrics are disabled", TEXT)
        c = state.counters
        text = (
            "# TYPE dstack_kms_attestation_requests_total counter\n"
            f"dstack_kms_attestation_requests_total {c.attestation_requests}\n"
            "# TYPE dstack_kms_attestation_failures_total counter\n"
            f"dstack_kms_attestation_failures_total {c.attestation_failures}\n"
        )
        return Answer(200, text.encode(), TEXT)

    server.route("GET", "/health", health)
    server.route("GET", "/metrics", metrics)
    k = state.keys
    port = await server.listen_tls(
        cfg.rpc_address,
        cfg.rpc_port,
        cert_pem=cert_pem(k.rpc_cert) + cert_pem(k.root_ca_cert),
        key_pem=key_pem(k.rpc_key),
        client_ca_pem=cert_pem(k.tmp_ca_cert),
        require_client_cert=False,
    )
    return server, port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dstack-kms", description="the dstack key management service"
    )
    parser.add_argument("-c", "--config", type=Path, required=True, help="kms.toml")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = KmsConfig.load(args.config)
    except (ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    async def run() -> int:
        from pydstack.process import stop_signal

        try:
            state = await make_state(cfg)
        except SelfNotAllowed as e:
            print(f"error: {e} (this kms: {e.identity})", file=sys.stderr)
            return 2
        except (DstackError, OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        try:
            admin = None
            if cfg.admin_enabled:
                try:
                    admin = admin_server(
                        admin_token(cfg.admin_auth_token),
                        cfg.image_cache_dir,
                        insecure_no_auth=cfg.admin_insecure_no_auth,
                        limits=cfg.server_limits,
                        guard=cfg.guard(),
                    )
                except ValueError as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 2
                aport = await admin.listen_tcp(cfg.admin_address, cfg.admin_port)
                print(f"dstack-kms admin on http://{cfg.admin_address}:{aport}", flush=True)
            server, port = await start(cfg, state)
            print(f"dstack-kms listening on https://{cfg.rpc_address}:{port}", flush=True)
            try:
                await stop_signal().wait()
            finally:
                await server.close()
                if admin is not None:
                    await admin.close()
            return 0
        finally:
            await state.auth.close()

    from pydstack.process import run_server

    return run_server(run())


if __name__ == "__main__":
    sys.exit(main())
