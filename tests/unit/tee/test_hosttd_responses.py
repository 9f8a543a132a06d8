"""what a CVM accepts from its host's TD: a HostTdError for anything malformed (a fuzzing
finding: 8 MiB of `[` made json.loads raise RecursionError in the guest)."""

from __future__ import annotations

import pytest

from pydstack.tee.hosttd import HostTdError, parse_quote_response, parse_response


@pytest.mark.parametrize(
    ("status", "body", "why"),
    [
        (200, b"[" * 100_000, "invalid json"),
        (200, b'{"quote": "00"', "invalid json"),
        (200, b"\xff\xfe{\x00}\x00", "invalid json"),  # utf-16
        (200, b"[1]", "non-object"),
        (400, b"[" * 100_000, "refused GetQuote: http 400"),
        (400, b'{"error": "' + b"x" * 1000 + b'"}', "refused GetQuote: " + "x" * 200 + "$"),
    ],
)
def test_malformed_answers_are_host_td_errors(status, body, why):
    with pytest.raises(HostTdError, match=why):
        parse_response("GetQuote", status, body)


def test_well_formed_answers_parse():
    assert parse_response("ExtendRtmr", 200, b"null") == {}
    assert parse_response("ExtendRtmr", 200, b"") == {}
    quote, log = parse_quote_response(
        parse_response("GetQuote", 200, b'{"quote": "0a", "event_log": "[]"}')
    )
    assert (quote, log) == (b"\n", [])
