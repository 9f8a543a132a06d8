"""pydstack.sdk against the simulator: the checks the official suite makes, and the errors."""

from __future__ import annotations

import hashlib
import json
import warnings

import httpx
import pytest

from pydstack.attest.eventlog import event_log_from_json, replay_rtmrs
from pydstack.attest.quote import parse_quote
from pydstack.attest.verify import verify_quote
from pydstack.sdk import (
    AsyncDstackClient,
    AsyncTappdClient,
    DstackClient,
    GetKeyResponse,
    TappdClient,
    TcbInfoV05x,
)
from pydstack.sdk.ethereum import to_account
from pydstack.sdk.solana import to_keypair, to_keypair_secure

from .simulator_proc import start_simulator


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    s = start_simulator(tmp_path_factory.mktemp("sim-sdk"))
    yield s
    s.stop()


@pytest.fixture(params=["unix", "http"])
def endpoint(sim, request):
    return str(sim.dstack_sock) if request.param == "unix" else sim.http


def test_sync_client(sim, endpoint):
    client = DstackClient(endpoint)
    key = client.get_key("/test", "p")
    assert len(key.decode_key()) == 32 and len(key.decode_signature_chain()) == 2
    assert client.get_key("/test", "p", "k256").key == key.key
    assert len(client.get_key("/ed", "p", "ed25519").decode_key()) == 32
    quote = client.get_quote(b"test")
    assert parse_quote(quote.decode_quote()).report_data == b"test" + bytes(60)
    root = (sim.dir / "mock-root-ca.der").read_bytes()
    assert (
        verify_quote(
            quote.decode_quote(), (sim.dir / "collateral.json").read_text(), root_ca_der=root
        ).status
        == "UpToDate"
    )
    report = parse_quote(quote.decode_quote()).td_report
    assert report is not None
    rtmrs = quote.replay_rtmrs()
    assert [rtmrs[i] for i in range(4)] == [m.hex() for m in report.rtmrs]
    assert replay_rtmrs(event_log_from_json(quote.event_log)) == report.rtmrs
    info = client.info()
    assert isinstance(info.tcb_info, TcbInfoV05x)
    assert len(info.tcb_info.mrtd) == 96 and len(info.compose_hash) == 64
    assert info.tcb_info.event_log and info.tcb_info.app_compose
    tls = client.get_tls_key(
        subject="x", alt_names=["localhost", "127.0.0.1"], usage_ra_tls=True, usage_client_auth=True
    )
    assert tls.key.startswith("-----BEGIN PRIVATE KEY-----") and len(tls.certificate_chain) == 2
    assert len(tls.as_uint8array(32)) == 32 and len(tls.as_uint8array()) > 32
    assert client.get_tls_key().key != tls.key
    assert client.attest(b"x").decode_attestation()
    for alg, data in (("ed25519", b"hi"), ("secp256k1", b"hi"), ("secp256k1_prehashed", bytes(32))):
        s = client.sign(alg, data)
        assert client.verify(alg, data, s.decode_signature(), s.decode_public_key()).valid
        assert not client.verify(
            alg, b"\x01" * 32, s.decode_signature(), s.decode_public_key()
        ).valid
    assert client.version().version and client.is_reachable()
    nb = client.get_tls_key(subject="y", not_before=1_700_000_000, not_after=1_800_000_000)
    assert nb.certificate_chain


async def test_async_client_and_reuse(sim, endpoint):
    async with AsyncDstackClient(endpoint) as client:
        a = await client.get_key("/a")
        b = await client.get_key("/a")
        assert a.key == b.key and client._client is not None
        assert (await client.info()).app_id
        # the sync client works inside a running event loop too
        assert DstackClient(endpoint).get_key("/a").key == a.key
    assert client._client is None


def test_errors(sim, tmp_path):
    client = DstackClient(str(sim.dstack_sock))
    with pytest.raises(httpx.HTTPStatusError, match="Unsupported algorithm"):
        client.get_key("/x", algorithm="rsa")
    with pytest.raises(ValueError, match="64 bytes"):
        client.get_quote(b"x" * 65)
    with pytest.raises(ValueError, match="empty"):
        client.get_quote(b"")
    with pytest.raises(ValueError, match="32-byte digest"):
        client.sign("secp256k1_prehashed", b"short")
    missing = tmp_path / "nope.sock"
    with pytest.raises(FileNotFoundError, match=f"Unix socket file {missing} does not exist"):
        DstackClient(str(missing))
    down = DstackClient("http://127.0.0.1:9")
    assert not down.is_reachable()
    with pytest.raises(httpx.ConnectError):
        down.version()


def test_endpoint_from_environment(sim, monkeypatch):
    monkeypatch.setenv("DSTACK_SIMULATOR_ENDPOINT", sim.http)
    assert DstackClient().async_client.base_url == sim.http
    monkeypatch.setenv("TAPPD_SIMULATOR_ENDPOINT", str(sim.tappd_sock))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tappd = TappdClient()
    assert any("deprecated" in str(w.message) for w in caught)
    key = tappd.derive_key("/", "test")
    assert len(key.certificate_chain) == 2
    q = tappd.tdx_quote(b"test data")
    assert parse_quote(q.decode_quote()).report_data == b"test data".rjust(64, b"\0")
    q2 = tappd.tdx_quote(b"test data", "sha256")
    assert (
        parse_quote(q2.decode_quote()).report_data[:32]
        == hashlib.sha256(b"app-data:test data").digest()
    )
    assert tappd.info().tcb_info.mrtd


async def test_async_tappd(sim):
    with pytest.warns(DeprecationWarning):
        client = AsyncTappdClient(str(sim.tappd_sock))
    assert await client.is_reachable()


def test_key_helpers(sim):
    client = DstackClient(str(sim.dstack_sock))
    key = client.get_key("test")
    acct = to_account(key)
    assert acct.key == key.decode_key()
    kp = to_keypair(key)
    assert bytes(kp.secret()) == key.decode_key()[:32]
    tls = client.get_tls_key()
    with pytest.warns(DeprecationWarning, match="getTlsKey"):
        secure = to_keypair_secure(tls)
    assert bytes(secure.secret()) == hashlib.sha256(tls.as_uint8array()).digest()
    assert isinstance(GetKeyResponse(**json.loads(key.model_dump_json())), GetKeyResponse)
