"""how `dstack` prints: vmm-cli's ascii tables, status and gpu cells, JSON dumps of messages."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable

from google.protobuf.message import Message

from pydstack.rpc.json_codec import message_to_obj
from pydstack.rpc.proto import vmm_rpc_pb2 as pb


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells: list[str]) -> str:
        return "|" + "|".join(f" {c:<{w}} " for c, w in zip(cells, widths, strict=True)) + "|"

    return "\n".join([sep, line(headers), sep, *(line(r) for r in rows), sep])


def print_json(messages: Message | Iterable[Message]) -> None:
    """a message (or a list of them) in the prpc JSON form the VMM itself answers with."""
    if isinstance(messages, Message):
        value = message_to_obj(messages)
    else:
        value = [message_to_obj(m) for m in messages]
    print(json.dumps(value, indent=2))


def status(vm: pb.VmInfo) -> str:
    return f"{vm.status} (boot error)" if vm.boot_error else vm.status


def gpus(cfg: pb.VmConfiguration) -> str:
    if cfg.gpus.attach_mode == "all":
        return "All GPUs"
    return ", ".join(g.slot for g in cfg.gpus.gpus) or "-"


def ms_time(value: int) -> str:
    """a millisecond unix timestamp as UTC text ("-" for none)."""
    if not value:
        return "-"
    ts = value / 1000
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
