"""the target of `pydstack.vmm`: the simulated TD's saved state, read back after a restart."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from fuzz import mutators as m
from fuzz.harness import Target
from fuzz.targets import common as c
from pydstack.vmm.td import STATE_FILE, TdIdentity, VmTd


def _make_td_state() -> Callable[[bytes], object]:
    path = Path(tempfile.mkdtemp(prefix="fuzz-td-")) / STATE_FILE

    def call(data: bytes) -> None:
        path.write_bytes(data)
        VmTd.resume(c.TD_SEED, path)

    return call


def _td_seeds() -> list[tuple[str, bytes]]:
    identity = TdIdentity(c.OS_IMAGE, b"\x05" * 32)
    doc = {**identity.to_json(), "events": [ev.to_log_line() for ev in c.cvm().runtime]}
    return [
        ("state", json.dumps(doc).encode()),
        ("no-events", json.dumps({**doc, "events": []}).encode()),
    ]


TD_STATE = Target(
    name="td_state",
    doc="`vmm/td.py::VmTd.resume`: a simulated TD rebuilt from its `td-state.json` (allowed: "
    "what its caller in `vmm/app.py` catches, ValueError and KeyError; the VMM documents no "
    "error type of its own)",
    make=_make_td_state,
    allowed=(ValueError, KeyError),
    seeds=_td_seeds,
    mutators=m.JSON,
    tokens=(b'"os_image"', b'"compose_hash"', b'"events"', b'"event"', b'"payload"'),
    max_len=16 * 1024,
)

TARGETS: Sequence[Target] = (TD_STATE,)
