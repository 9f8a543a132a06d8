"""run the data plane alone: ``python -m pydstack.gateway.serve -c gateway.toml [--routes r.json]``.

For benchmarks and tests of the relay without the control plane: the certificate is the legacy
static one (``[core.proxy] base_domain / cert_chain / cert_key``), backends are the debug
``localhost`` id (``core.debug.insecure_localhost_backend``) and, optionally, instances from a
JSON file in :meth:`~.routes.RouteTable.snapshot` form. Runs ``[core.proxy] workers`` processes
and prints ``ready <port> ...`` on stdout once they listen; SIGTERM stops them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from pathlib import Path

from pydstack.errors import ConfigError

from .certstore import CertStore, CertStoreError
from .config import ProxyConfig
from .routes import RouteSettings, RouteTable
from .workers import WorkerPool


def load_static(config: ProxyConfig) -> tuple[RouteTable, CertStore]:
    """the table and the legacy static certificate of `config` (ConfigError when unreadable)."""
    t = config.timeouts
    table = RouteTable(
        RouteSettings(
            connect_top_n=config.connect_top_n,
            cache_top_n=t.cache_top_n,
            handshake_stale=t.handshake_stale,
            max_connections_per_app=config.max_connections_per_app,
        )
    )
    certs = CertStore(config.tls_versions)
    if config.base_domain:
        try:
            chain = Path(config.cert_chain).read_text()
            key = Path(config.cert_key).read_text()
            certs.set(config.base_domain, chain, key)
        except OSError as e:
            raise ConfigError(f"core.proxy.cert_chain/cert_key: cannot read: {e.strerror}") from e
        except CertStoreError as e:
            raise ConfigError(f"core.proxy.cert_chain/cert_key: {e}") from e
    return table, certs


async def serve(config: ProxyConfig, routes: Path | None) -> None:
    table, certs = load_static(config)
    if routes is not None:
        table.load_snapshot(json.loads(routes.read_text()))
    pool = WorkerPool(config, table, certs)
    addrs = await pool.start()
    ports = sorted({int(a[1]) for a in addrs})
    print("ready " + " ".join(str(p) for p in ports), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await pool.stop()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(prog="python -m pydstack.gateway.serve")
    ap.add_argument("-c", "--config", type=Path, required=True)
    ap.add_argument("--routes", type=Path)
    args = ap.parse_args()
    try:
        config = ProxyConfig.load(args.config)
    except ConfigError as e:
        raise SystemExit(f"dstack-gateway data plane: {e}") from None
    import uvloop

    uvloop.run(serve(config, args.routes))


if __name__ == "__main__":
    main()
