"""`dstack-mr`: expected TDX measurements of an OS image.

* `dstack-mr measure IMAGE [-c CPUS] [-m MEMORY] [--qemu-version V] [--two-pass-add-pages
  true|false] [--acpi-digests L,R,T | --event-log FILE] [--json] [--cbor-out FILE]` — MRTD and
  RTMR0-2 of a CVM booted from the image directory IMAGE (or its `metadata.json`). RTMR0 needs
  the three ACPI digests QEMU's tables give (from a CVM's event log, or given as hex); without
  them it is printed as null. `--cbor-out` writes the image's `measurement.tdx.cbor`.
* `dstack-mr lite VM_CONFIG --event-log FILE [--json]` — the same from a lite vm_config
  (`tdx_measurement`) and an event log, without the image.

Exit status 0 on success, 1 when the image or input cannot be measured, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydstack.attest.errors import AttestError
from pydstack.attest.eventlog import MAX_EVENT_LOG_JSON, TdxEvent, event_log_from_json
from pydstack.types import jsonlimits
from pydstack.types.capped import read_capped

from .image import SANDBOX_KIND, ImageDir
from .lite import TdxMeasurements, lite_measurements
from .machine import MAX_DOCUMENT, VmMeasureConfig
from .tdvf import AcpiDigests
from .verify import acpi_digests

_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(i?B)?", re.IGNORECASE | re.ASCII)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """bytes from "2147483648", "2048M", "2G" or "2GiB"; ValueError otherwise."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"invalid size {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _event_log(path: Path) -> list[TdxEvent]:
    with open(path, "rb") as f:
        raw = read_capped(f, MAX_EVENT_LOG_JSON)
    doc = jsonlimits.loads(raw, max_bytes=MAX_EVENT_LOG_JSON)
    # a GetQuote response carries the log as a json string
    if isinstance(doc, dict) and isinstance(doc.get("event_log"), str):
        return event_log_from_json(doc["event_log"])
    return event_log_from_json(raw)


def _acpi(args: argparse.Namespace) -> AcpiDigests | None:
    if args.acpi_digests:
        parts = [bytes.fromhex(p) for p in args.acpi_digests.split(",")]
        if len(parts) != 3:
            raise ValueError("--acpi-digests needs three hex digests: loader,rsdp,tables")
        return AcpiDigests(*parts)
    if args.event_log:
        return acpi_digests(_event_log(args.event_log))
    return None


def _print(values: Mapping[str, str | None], as_json: bool) -> None:
    if as_json:
        print(json.dumps(values, indent=2))
        return
    print("Machine measurements:")
    for name, value in values.items():
        print(f"{name.upper()}: {value if value is not None else '(needs the acpi digests)'}")


def cmd_measure(args: argparse.Namespace) -> int:
    path = args.image.parent if args.image.name == "metadata.json" else args.image
    image = ImageDir.open(path)
    acpi = _acpi(args)
    if image.kind == SANDBOX_KIND:
        _print(image.sandbox_measurements().to_json_obj(), args.json)
        return 0
    obj: dict[str, Any] = {
        "os_image_hash": image.identity.hex(),
        "cpu_count": args.cpu,
        "memory_size": args.memory,
    }
    if args.qemu_version:
        obj["qemu_version"] = args.qemu_version
    if args.two_pass_add_pages is not None:
        obj["qemu_single_pass_add_pages"] = args.two_pass_add_pages
    vm = VmMeasureConfig.from_obj(obj)
    partial = image.partial(vm)
    values: dict[str, str | None] = {
        "mrtd": partial.mrtd.hex(),
        "rtmr0": partial.complete(acpi).rtmr0.hex() if acpi is not None else None,
        "rtmr1": partial.rtmr1.hex(),
        "rtmr2": partial.rtmr2.hex(),
    }
    if args.cbor_out:
        args.cbor_out.write_bytes(image.material().to_cbor())
        print(f"wrote {args.cbor_out}", file=sys.stderr)
    _print(values, args.json)
    return 0


def cmd_lite(args: argparse.Namespace) -> int:
    with open(args.vm_config, "rb") as f:
        doc = jsonlimits.loads(read_capped(f, MAX_DOCUMENT), max_bytes=MAX_DOCUMENT)
    if isinstance(doc, dict) and isinstance(doc.get("vm_config"), str):
        doc = jsonlimits.loads(doc["vm_config"], max_bytes=MAX_DOCUMENT)
    vm = VmMeasureConfig.from_obj(doc)
    m: TdxMeasurements = lite_measurements(vm, acpi_digests(_event_log(args.event_log)))
    _print(m.to_json_obj(), args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dstack-mr", description="expected tdx measurements")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="measure an image directory for a vm configuration")
    m.add_argument("image", type=Path, help="image directory or its metadata.json")
    m.add_argument("-c", "--cpu", type=int, default=1, help="vcpus (default 1)")
    m.add_argument("-m", "--memory", type=parse_size, default=2 << 30, help="memory (2G)")
    m.add_argument("--qemu-version", help="MAJOR.MINOR.PATCH (default 9.1.0)")
    m.add_argument("--two-pass-add-pages", type=_bool, help="override the page-add order")
    src = m.add_mutually_exclusive_group()
    src.add_argument("--acpi-digests", help="loader,rsdp,tables as hex sha384 digests")
    src.add_argument("--event-log", type=Path, help="an event log (json, or a GetQuote reply)")
    m.add_argument("--json", action="store_true", help="print json")
    m.add_argument("--cbor-out", type=Path, help="write the image's measurement.tdx.cbor here")
    m.set_defaults(func=cmd_measure)
    lite = sub.add_parser("lite", help="measure from a lite vm_config and an event log")
    lite.add_argument("vm_config", type=Path, help="vm_config json (or a GetQuote reply)")
    lite.add_argument("--event-log", type=Path, required=True)
    lite.add_argument("--json", action="store_true", help="print json")
    lite.set_defaults(func=cmd_lite)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (AttestError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
