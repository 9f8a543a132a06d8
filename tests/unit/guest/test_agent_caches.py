"""the agent serves what cannot change within a boot from memory: GetKey per (path, purpose,
algorithm), Info until RTMR3 moves; per boot and per app, never shared, bounded."""

from __future__ import annotations

import pytest

from pydstack.attest.eventlog import RuntimeEvent
from pydstack.crypto import k256
from pydstack.guest import core as core_mod
from pydstack.guest.simulator import boot, prepare


@pytest.fixture
def agent(tmp_path):
    return boot(prepare(tmp_path / "a", bytes(range(32))))


def test_get_key_is_computed_once_per_boot(agent, monkeypatch):
    _, core = agent
    calls = []
    real = k256.get_key_chain

    def counting(*a, **kw):
        calls.append(a[1:4])
        return real(*a, **kw)

    monkeypatch.setattr(core_mod.k256, "get_key_chain", counting)
    first = core.get_key("wallet/eth", "signing", "secp256k1")
    again = core.get_key("wallet/eth", "signing", "secp256k1")
    assert first == again and len(calls) == 1
    assert core.cached_key("wallet/eth", "signing", "secp256k1") == first
    assert core.cached_key("other", "signing", "secp256k1") is None
    # what the cache hands out cannot alter what it keeps
    first[1].clear()
    assert core.get_key("wallet/eth", "signing", "secp256k1")[1]
    # other paths are other keys; another algorithm is another entry (upstream derives the
    # same key bytes for both algorithms, its signature chain differs)
    assert core.get_key("wallet/other", "signing", "secp256k1")[0] != first[0]
    assert core.get_key("wallet/eth", "signing", "ed25519")[1] != first[1]
    assert len(calls) == 3


def test_the_key_cache_is_bounded(agent, monkeypatch):
    _, core = agent
    monkeypatch.setattr(core_mod, "KEY_CACHE_SIZE", 8)
    for i in range(20):
        core.get_key(f"p{i}", "", "")
    assert len(core._keys) == 8
    assert core.cached_key("p0", "", "") is None and core.cached_key("p19", "", "") is not None


def test_caches_are_per_app(tmp_path):
    _, a = boot(prepare(tmp_path / "a", bytes(range(32))))
    _, b = boot(prepare(tmp_path / "b", bytes(range(1, 33))))
    assert a.get_key("p", "", "")[0] != b.get_key("p", "", "")[0]
    assert b.cached_key("p", "", "") != a.cached_key("p", "", "")


def test_info_is_served_from_memory_until_rtmr3_moves(agent):
    tdx, core = agent
    first = core.info(external=False)
    assert core.cached_info(external=False) is first
    assert core.info(external=False) is first
    assert core.cached_info(external=True) is None  # the external view is its own
    tdx.extend_rtmr3(RuntimeEvent("late-event", b"x"))
    assert core.cached_info(external=False) is None
    after = core.info(external=False)
    assert after is not first and after.tcb_info != first.tcb_info


@pytest.mark.parametrize(
    ("event_log", "vm_config", "attestation"),
    [
        (None, None, None),  # as the simulator answers
        ('[{"event":"caf\u00e9 \\ "q"\n"}]', "", b""),  # escapes; no attestation
        ("", '{"k":"\u2603"}', b"\x00\xff"),
    ],
)
def test_get_quote_json_is_the_generic_encoding(agent, event_log, vm_config, attestation):
    """GetQuote's JSON, written from parts (the encoder's hex where it made it), is byte for byte
    what the generic encoder writes, with and without the attestation left out when empty."""
    import binascii

    from pydstack.guest.service import QUOTE_OMIT, _quote, _QuoteTexts
    from pydstack.rpc.json_codec import message_to_json

    _, core = agent
    result = core.get_quote(b"\x07" * 64)
    assert result.quote_hex == binascii.hexlify(result.quote)  # the simulator's kept pieces
    assert result.attestation_hex == binascii.hexlify(result.attestation)
    changes = {"event_log": event_log, "vm_config": vm_config, "attestation": attestation}
    changes = {k: v for k, v in changes.items() if v is not None}
    if "attestation" in changes:
        changes["attestation_hex"] = b""
    result = result._replace(**changes)
    texts = _QuoteTexts()
    for _ in range(2):  # the texts are escaped once, then reused
        reply = texts.reply(result)
        for omit in (frozenset(), QUOTE_OMIT["GetQuote"]):
            assert reply.json(omit) == message_to_json(_quote(result), omit)
        assert reply.proto() == _quote(result).SerializeToString()
    # a new runtime event (a new event log), then another config: neither served stale
    for later in (
        result._replace(event_log=result.event_log + " "),
        result._replace(event_log=result.event_log + " ", vm_config="{}"),
    ):
        reply = texts.reply(later)
        assert reply.json(frozenset()) == message_to_json(_quote(later), frozenset())
