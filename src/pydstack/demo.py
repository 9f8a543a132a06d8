"""the main job, until the VMM lands: a simulated CVM serving the guest API, checked end to end.

    python -m pydstack.demo [--dir ./run/demo] [--serve]

1. `dstack-simulator` state in DIR: a simulated TD boots, measures the app into RTMR3 and serves
   dstack.sock / tappd.sock / HTTP;
2. a mock PCCS serves the simulated platform's collateral on loopback;
3. an app (pydstack.sdk) asks for a key and a quote;
4. a verifier fetches collateral from the PCCS, verifies the quote against the mock root under the
   default policy, replays the event log to RTMR3 and checks the compose hash it measured.
With `--serve` the agent keeps running afterwards (Ctrl-C stops it).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
from pathlib import Path

from pydstack.attest.eventlog import event_log_from_json, replay_rtmrs
from pydstack.attest.verify import CollateralCache, verify_quote
from pydstack.guest.simulator import boot, prepare, serve, stop_signal
from pydstack.sdk import AsyncDstackClient
from pydstack.tee.collateral_server import start_server


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


async def run(directory: Path, keep_serving: bool) -> int:
    _step(f"booting a simulated cvm in {directory}")
    state = prepare(directory)
    tdx, core = boot(state)
    group, endpoints = await serve(core, state.dir, ("127.0.0.1", 0))
    pccs, pccs_url = await start_server(tdx.collateral(), tdx.pki.platform.fmspc.hex())
    try:
        _step(f"guest agent on {endpoints['dstack']} and {endpoints['http']}")
        _step(f"mock pccs serving collateral on {pccs_url}")
        async with AsyncDstackClient(endpoints["dstack"]) as app:
            info = await app.info()
            key = await app.get_key("demo/wallet", "signing")
            nonce = hashlib.sha256(b"demo nonce").digest()
            quote = await app.get_quote(nonce)
        print(f"    app {info.app_id}  instance {info.instance_id}")
        print(f"    derived key path demo/wallet: public chain of {len(key.signature_chain)} sigs")
        _step("verifying the quote as a remote verifier would")
        raw = quote.decode_quote()
        collateral = await CollateralCache(pccs_url).get(raw)
        verified = verify_quote(raw, collateral, root_ca_der=tdx.root_ca_der)
        report = verified.quote.td_report
        assert report is not None
        events = event_log_from_json(quote.event_log)
        replayed = replay_rtmrs(events)
        compose_hash = hashlib.sha256(state.compose_raw).digest()
        measured = next(e.event_payload for e in events if e.event == "compose-hash")
        checks = {
            f"dcap signature chain and tcb ({verified.status})": True,
            "report_data carries our nonce": report.report_data[:32] == nonce,
            "event log replays to RTMR0-3": replayed == report.rtmrs,
            "RTMR3 measured this app-compose.json": measured == compose_hash,
        }
        for name, good in checks.items():
            print(f"    [{'ok' if good else 'FAILED'}] {name}")
        print(f"    mrtd  {report.mr_td.hex()[:32]}...  rtmr3 {report.rtmr3.hex()[:32]}...")
        print(f"    mock root ca: {state.dir / 'mock-root-ca.der'}")
        if not all(checks.values()):
            return 1
        if keep_serving:
            print(f"export DSTACK_SIMULATOR_ENDPOINT={endpoints['http']}", flush=True)
            await stop_signal().wait()
        _step("done")
        return 0
    finally:
        await pccs.cleanup()
        await group.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pydstack.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dir", type=Path, default=Path("run/demo"))
    parser.add_argument("--serve", action="store_true", help="keep the agent running afterwards")
    args = parser.parse_args(argv)
    return asyncio.run(run(args.dir.resolve(), args.serve))


if __name__ == "__main__":
    sys.exit(main())
