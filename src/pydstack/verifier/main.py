"""`dstack-verifier -c verifier.toml`: the verification service; `--verify FILE` for one request.

With `--verify FILE` (a `/verify` request body: an Attest or GetQuote response) it verifies once,
prints the response and writes it to `FILE.verification.json`; the exit status is 0 when the
evidence is valid, 1 when not, 2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from pydstack.errors import ConfigError
from pydstack.types import jsonlimits

from .config import VerifierConfig
from .service import MAX_BODY, build_verifier, make_server

log = logging.getLogger("dstack-verifier")


async def verify_file(cfg: VerifierConfig, path: Path) -> int:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BODY + 1)
        body = jsonlimits.loads(raw, max_bytes=MAX_BODY)
    except OSError as e:
        print(f"error: cannot read {path}: {e.strerror}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {path} is not a json request: {e}", file=sys.stderr)
        return 2
    result = await build_verifier(cfg).verify_request(body)
    text = json.dumps(result.to_json_obj(), indent=2)
    print(text)
    out = path.with_name(path.name + ".verification.json")
    out.write_text(text + "\n")
    return 0 if result.is_valid else 1


async def serve(cfg: VerifierConfig) -> int:
    from pydstack.process import stop_signal

    server, _ = make_server(cfg, build_verifier(cfg))
    port = await server.listen_tcp(cfg.address, cfg.port)
    print(f"dstack-verifier listening on http://{cfg.address}:{port}", flush=True)
    try:
        await stop_signal().wait()
    finally:
        await server.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dstack-verifier", description="verify dstack attestations down to the os image"
    )
    parser.add_argument(
        "-c", "--config", type=Path, help="dstack-verifier.toml (default: defaults)"
    )
    parser.add_argument("--verify", type=Path, metavar="FILE", help="verify one request and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = VerifierConfig.load(args.config) if args.config else VerifierConfig()
        if args.verify is not None:
            return asyncio.run(verify_file(cfg, args.verify))
        from pydstack.process import run_server

        return run_server(serve(cfg))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
