"""`dstack`: the VMM command line (upstream vmm-cli's subcommands, flags and output).

Talks JSON prpc to a dstack-vmm at `--url` (`http://`, `https://`, or `unix:/path.sock`; default
`DSTACK_VMM_URL`, then `~/.dstack-vmm/config.json`'s `url`, then a discovered running VMM, then
http://localhost:8080). Every request is a `vmm_rpc_pb2` message sent through the prpc JSON
codec, and every answer decodes into one. Environment variables given with `--env-file` are
encrypted here, on the client, to the app's env public key, after the KMS's signature on that
key is checked (:mod:`.envkeys`).

Modules: `common` (client, errors, files), `envkeys` (signer trust, env encryption, `kms`),
`output` (tables), `vms` (listing and lifecycle), `deploy` (`compose`, `deploy`), `update`
(`update*`, `resize`), `images` (`image push|ls-registry|pull|rm`), `vmms` (`vmm`, url
resolution), `main` (the parser and the entry point).
"""

from __future__ import annotations

from .common import DEFAULT_URL, CliError, VmmClient
from .main import build_parser, main
from .output import table
from .vmms import resolve_url

__all__ = ["DEFAULT_URL", "CliError", "VmmClient", "build_parser", "main", "resolve_url", "table"]
