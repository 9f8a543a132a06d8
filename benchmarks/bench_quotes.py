"""quote parsing, simulated quote generation and verification per second on one core.

Ours (parse_quote, verify_quote with the policy layer) next to raw dcap-qvl on the same input.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import dcap_qvl

sys.path.insert(0, str(Path(__file__).parent))
from common import rate, row

from pydstack.attest.eventlog import parse_ccel, replay_rtmrs
from pydstack.attest.quote import parse_quote
from pydstack.attest.verify import precheck_quote, verify_quote
from pydstack.tee.simulated import SimulatedTdx

VECTORS = Path(os.environ.get("PYDSTACK_VECTORS", Path(__file__).parents[1] / "tests" / "vectors"))


def main() -> None:
    secs = float(os.environ.get("BENCH_SECONDS", "2"))
    real = (VECTORS / "dcap-qvl/tdx_quote").read_bytes()
    col_json = (VECTORS / "dcap-qvl/tdx_quote_collateral.json").read_text()
    issue = json.loads(json.loads(col_json)["tcb_info"])["issueDate"]
    now = int(dt.datetime.fromisoformat(issue.replace("Z", "+00:00")).timestamp()) + 3600
    col = dcap_qvl.QuoteCollateralV3.from_json(col_json)
    tdx = SimulatedTdx(bytes(32))
    sim_quote = tdx.get_quote(b"bench")
    sim_col_json = tdx.collateral_json()
    sim_col = dcap_qvl.QuoteCollateralV3.from_json(sim_col_json)
    ccel = (VECTORS / "dstack/ccel.bin").read_bytes()
    t_now = int(time.time())
    print(f"# quotes, one core, {secs:.0f} s per row")
    for name, fn in [
        ("parse_quote (ours, real v4)", lambda: parse_quote(real)),
        ("dcap_qvl.parse_quote (reference)", lambda: dcap_qvl.parse_quote(real)),
        ("parse_ccel + replay (18 events)", lambda: replay_rtmrs(parse_ccel(ccel))),
        ("SimulatedTdx.get_quote", lambda: tdx.get_quote(b"bench")),
        ("precheck_quote real (signatures, no collateral)", lambda: precheck_quote(real, now=now)),
        ("verify_quote real (ours, policy)", lambda: verify_quote(real, col, now=now)),
        ("dcap_qvl.verify real (reference)", lambda: dcap_qvl.verify(real, col, now)),
        (
            "verify_quote simulated (ours, policy)",
            lambda: verify_quote(sim_quote, sim_col, root_ca_der=tdx.root_ca_der),
        ),
        (
            "dcap_qvl.verify_with_root_ca simulated (ref.)",
            lambda: dcap_qvl.verify_with_root_ca(sim_quote, sim_col, tdx.root_ca_der, t_now),
        ),
    ]:
        per_s, lat = rate(fn, secs)
        print(row(name, per_s, lat), flush=True)


if __name__ == "__main__":
    main()
