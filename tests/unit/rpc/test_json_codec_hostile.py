"""the prpc JSON codec answers hostile input with CodecError, never a foreign exception.

Each case below once escaped as SystemError, AttributeError, UnicodeEncodeError or ValueError
(found by fuzzing), which a server turns into HTTP 500 instead of a clear 400.
"""

from __future__ import annotations

import json

import pytest

from pydstack.rpc.json_codec import (
    MAX_QUERY_FIELDS,
    CodecError,
    json_to_message,
    query_to_message,
)
from pydstack.rpc.proto import agent_rpc_pb2 as apb
from pydstack.rpc.proto import vmm_rpc_pb2 as pb
from tests.peak import allocation_peak


def test_lone_surrogate_key_is_an_unknown_field():
    msg = json_to_message(b'{"\\udfff": 1, "name": "ok"}', pb.VmConfiguration())
    assert msg.name == "ok"


def test_lone_surrogate_string_value_is_refused():
    with pytest.raises(CodecError, match="lone surrogate"):
        json_to_message(b'{"name": "a\\udfffb"}', pb.VmConfiguration())


@pytest.mark.parametrize("text", ["--1", "1-", "\u00b2", "\u0661", "1_000", " 1", "0x10", ""])
def test_integer_strings_are_ascii_decimal_only(text):
    body = json.dumps({"memory": text}).encode()
    with pytest.raises(CodecError, match="expected an integer"):
        json_to_message(body, pb.VmConfiguration())
    with pytest.raises(CodecError, match="expected an integer"):
        query_to_message(f"vcpu={text}", pb.VmConfiguration())


@pytest.mark.parametrize("text", ["de ad", " dead", "dead\n", "de\tad", "0xde ad", "abc", "zz"])
def test_hex_fields_are_hex_digits_only(text):
    """bytes.fromhex skips whitespace: "de ad" was a second spelling of b"\\xde\\xad"."""
    body = json.dumps({"report_data": text}).encode()
    with pytest.raises(CodecError, match="invalid hex"):
        json_to_message(body, apb.RawQuoteArgs())
    for ok, want in (("dead", b"\xde\xad"), ("0xDEAD", b"\xde\xad"), ("", b"")):
        body = json.dumps({"report_data": ok}).encode()
        assert json_to_message(body, apb.RawQuoteArgs()).report_data == want


def test_integer_strings_still_parse():
    assert json_to_message(b'{"memory": "-0"}', pb.VmConfiguration()).memory == 0
    assert json_to_message(b'{"memory": "2048"}', pb.VmConfiguration()).memory == 2048
    assert query_to_message("vcpu=4", pb.VmConfiguration()).vcpu == 4


@pytest.mark.parametrize("name", ["event%00", "event%00x", "ev%C3%A9nt", "1event"])
def test_query_names_that_only_resemble_a_field_are_unknown(name):
    msg = query_to_message(f"{name}=x&payload=00", apb.EmitEventArgs())
    assert msg.event == ""


def test_json_keys_that_only_resemble_a_field_are_unknown():
    msg = json_to_message(b'{"event\\u0000": "x", "payload": "00"}', apb.EmitEventArgs())
    assert msg.event == "" and msg.payload == b"\0"


def test_bodies_of_countless_items_are_refused_before_parsing():
    body_len = len(b"[" + b"{}," * 2_000_000 + b"{}]")  # 6 MiB, under the servers' body cap
    peak = allocation_peak(
        """
        from pydstack.rpc.json_codec import CodecError, json_to_message
        from pydstack.rpc.proto import vmm_rpc_pb2 as pb
        body = b"[" + b"{}," * 2_000_000 + b"{}]"
        """,
        """
        try:
            json_to_message(body, pb.VmConfiguration())
            raise SystemExit("accepted")
        except CodecError as e:
            assert "more than" in str(e), e
        """,
    )
    assert peak < 3 * body_len


def test_utf16_bodies_are_refused():
    with pytest.raises(CodecError, match="utf-8"):
        json_to_message('{"name": "x"}'.encode("utf-16"), pb.VmConfiguration())


def test_a_query_of_too_many_fields_is_refused_before_decoding():
    ok = "&".join(["kms_urls=u"] * MAX_QUERY_FIELDS)
    assert len(query_to_message(ok, pb.VmConfiguration()).kms_urls) == MAX_QUERY_FIELDS
    with pytest.raises(CodecError, match=f"more than {MAX_QUERY_FIELDS} query fields"):
        query_to_message(ok + "&x=1", pb.VmConfiguration())
    # separators alone count: 4 KiB of them was 4096 empty pairs decoded per message type
    with pytest.raises(CodecError, match="query fields"):
        query_to_message("&" * 4096, pb.VmConfiguration())
