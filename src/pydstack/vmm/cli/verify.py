"""`dstack verify <file|->`: verify an attestation and print what it proves, readably.

The input is a `/verify` request body: an Attest response (`{"attestation": hex}`) or a GetQuote
response (`quote`, `event_log`, `vm_config`). With `--verifier URL` it asks a running
dstack-verifier; otherwise it runs the same verification code here, with collateral from
`--pccs-url` and/or `--collateral FILE`, OS images from `--image-cache` (and
`--image-download-url`), and quotes accepted under `--root-ca` only when that root is given
(a simulated stack's mock root). `--json` prints the verifier's JSON response instead.

Exit status: 0 valid, 1 not valid, 2 when the input or an option cannot be used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import httpx

from pydstack.attest.errors import VerifyError
from pydstack.types import jsonlimits
from pydstack.types.capped import read_capped

MAX_INPUT = 24 * 1024 * 1024
_CHECKS = (
    ("quote", "quote_verified"),
    ("event log", "event_log_verified"),
    ("os image", "os_image_hash_verified"),
)


def _die(msg: str) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def _read(path: str) -> Any:
    try:
        if path == "-":
            raw = read_capped(sys.stdin.buffer, MAX_INPUT)
        else:
            with open(path, "rb") as f:
                raw = read_capped(f, MAX_INPUT)
    except OSError as e:
        _die(f"cannot read {path}: {e.strerror}")
    try:
        return jsonlimits.loads(raw, max_bytes=MAX_INPUT)
    except ValueError as e:
        _die(f"{path} is not a json attestation: {e}")


def _local(a: argparse.Namespace, body: Any) -> dict[str, Any]:
    from pydstack.attest.evidence import EvidenceVerifier
    from pydstack.attest.verify import CollateralCache
    from pydstack.mr.store import ImageStore
    from pydstack.mr.verify import OsImageVerifier

    collateral = CollateralCache(a.pccs_url or None)
    try:
        for path in a.collateral or []:
            collateral.load_file(Path(path))
        root = Path(a.root_ca).read_bytes() if a.root_ca else None
        store = ImageStore(Path(a.image_cache), a.image_download_url or "")
    except (VerifyError, OSError, ValueError) as e:
        _die(str(e))
    verifier = EvidenceVerifier(collateral, root_ca_der=root, images=OsImageVerifier(store))
    return asyncio.run(verifier.verify_request(body)).to_json_obj()


def _remote(url: str, body: Any) -> dict[str, Any]:
    try:
        resp = httpx.post(url.rstrip("/") + "/verify", json=body, timeout=600)
        out = resp.json()
    except (httpx.HTTPError, ValueError) as e:
        _die(f"cannot ask the verifier at {url}: {e}")
    if not isinstance(out, dict) or "is_valid" not in out:
        _die(f"the verifier at {url} did not answer a verification")
    return out


def summary(result: dict[str, Any]) -> str:
    """the verifier's response as a few aligned lines."""
    d = result.get("details") or {}
    lines = [("valid", "yes" if result.get("is_valid") else "no")]
    for name, key in _CHECKS:
        lines.append((name, "verified" if d.get(key) else "not verified"))
    lines.append(("acpi tables", "verified" if d.get("acpi_tables_verified") else "not verified"))
    if d.get("tcb_status"):
        adv = d.get("advisory_ids") or []
        lines.append(("tcb status", d["tcb_status"] + (f" ({', '.join(adv)})" if adv else "")))
    if d.get("os_image_version") or d.get("os_image_is_dev") is not None:
        dev = {True: "dev", False: "production", None: ""}[d.get("os_image_is_dev")]
        lines.append(("os image", " ".join(x for x in (d.get("os_image_version"), dev) if x)))
    app = d.get("app_info") or {}
    for key in ("app_id", "compose_hash", "instance_id", "device_id", "os_image_hash"):
        if app.get(key):
            lines.append((key.replace("_", " "), app[key]))
    kp = d.get("key_provider")
    if kp:
        lines.append(("key provider", f"{kp.get('name')} {kp.get('id')}".strip()))
    for key in ("mr_system", "mr_aggregated", "mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"):
        if app.get(key):
            lines.append((key, app[key]))
    if d.get("report_data"):
        lines.append(("report data", d["report_data"]))
    width = max(len(k) for k, _ in lines) + 1
    out = [f"{k + ':':<{width}} {v}" for k, v in lines]
    if result.get("reason"):
        out.append("")
        out += [f"refused: {part}" for part in str(result["reason"]).split("; ")]
    return "\n".join(out)


def cmd_verify(_: object, a: argparse.Namespace) -> None:
    body = _read(a.file)
    result = _remote(a.verifier, body) if a.verifier else _local(a, body)
    print(json.dumps(result, indent=2) if a.json else summary(result))
    if not result.get("is_valid"):
        sys.exit(1)


def add_parsers(sub: Any) -> None:
    """register `dstack verify` on the CLI's subcommands."""
    s = sub.add_parser("verify", help="verify an attestation or a GetQuote response (local)")
    s.add_argument("file", help="the json file, or - for stdin")
    s.add_argument("--verifier", metavar="URL", help="ask this dstack-verifier instead")
    s.add_argument("--pccs-url", help="fetch dcap collateral here")
    s.add_argument("--collateral", action="append", metavar="FILE", help="collateral json")
    s.add_argument("--root-ca", metavar="FILE", help="accept quotes under this root (der)")
    s.add_argument("--image-cache", default=".", help="os image directory (default .)")
    s.add_argument("--image-download-url", help="url template with {OS_IMAGE_HASH}")
    s.add_argument("--json", action="store_true", help="print the verifier's json response")
    s.set_defaults(func=cmd_verify, local=True)
