"""the official SDKs, unchanged, against our simulator."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import textwrap

import pytest

from pydstack.attest.verify import verify_quote

from .official_sdk import js_sdk, run_python_suite
from .simulator_proc import start_simulator


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    s = start_simulator(tmp_path_factory.mktemp("sim-official"))
    yield s
    s.stop()


def test_official_python_sdk_suite(sim, tmp_path):
    result = run_python_suite(str(sim.dstack_sock), str(sim.tappd_sock), tmp_path)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))  # type: ignore[union-attr]
    assert passed >= 120 and "failed" not in summary and "skipped" not in summary, summary


def test_official_python_sdk_suite_over_http(sim, tmp_path):
    result = run_python_suite(sim.http, sim.http, tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


JS_CHECK = textwrap.dedent("""
    const { DstackClient } = require('@phala/dstack-sdk');
    (async () => {
      const client = new DstackClient(process.argv[2]);
      const key = await client.getKey('/js/test', 'js');
      const quote = await client.getQuote('from-js');
      const info = await client.info();
      const tls = await client.getTlsKey({ subject: 'js.local', altNames: ['js.local'] });
      console.log(JSON.stringify({
        key: Buffer.from(key.key).toString('hex'),
        chain: key.signature_chain.length,
        quote: quote.quote, event_log: quote.event_log,
        app_id: info.app_id, tcb_compose: info.tcb_info.compose_hash,
        tls_key: tls.key.slice(0, 27), tls_chain: tls.certificate_chain.length,
      }));
    })().catch((e) => { console.error(e); process.exit(1); });
""")


@pytest.mark.parametrize("transport", ["unix", "http"])
def test_official_js_sdk(sim, tmp_path, transport):
    from pydstack.crypto.kdf import derive_key
    from pydstack.guest.appkeys import AppKeys

    root = js_sdk()
    script = root / "check.js"
    script.write_text(JS_CHECK)
    endpoint = str(sim.dstack_sock) if transport == "unix" else sim.http
    out = subprocess.run(
        ["node", str(script), endpoint], capture_output=True, text=True, timeout=120, cwd=root
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    keys = AppKeys.load(sim.dir / ".appkeys.json")
    assert r["key"] == derive_key(keys.k256_key, [b"/js/test"]).hex()
    assert r["chain"] == 2
    quote = bytes.fromhex(r["quote"].removeprefix("0x"))
    root_ca = (sim.dir / "mock-root-ca.der").read_bytes()
    v = verify_quote(quote, (sim.dir / "collateral.json").read_text(), root_ca_der=root_ca)
    assert v.quote.report_data.rstrip(b"\0") == b"from-js"
    assert json.loads(r["event_log"])
    compose_hash = hashlib.sha256((sim.dir / "app-compose.json").read_bytes()).hexdigest()
    assert r["tcb_compose"] == compose_hash and r["app_id"] == compose_hash[:40]
    assert r["tls_key"] == "-----BEGIN PRIVATE KEY-----" and r["tls_chain"] == 2
