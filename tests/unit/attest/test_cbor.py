"""the bounded CBOR codec: canonical encoding, and what decoding refuses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pydstack.attest import cbor
from pydstack.attest.errors import ParseError

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 64), max_value=(1 << 64) - 1)
    | st.binary(max_size=300)
    | st.text(max_size=50),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


@given(values)
def test_round_trip(value):
    assert cbor.decode(cbor.encode(value)) == value
    assert cbor.encode(cbor.decode(cbor.encode(value))) == cbor.encode(value)


def test_shortest_lengths_and_key_order():
    assert cbor.encode(23) == b"\x17"
    assert cbor.encode(24) == b"\x18\x18"
    assert cbor.encode(-1) == b"\x20"
    assert cbor.encode(b"\x01" * 24)[:2] == b"\x58\x18"
    assert cbor.encode({"b": 1, "a": 2}) == b"\xa2\x61b\x01\x61a\x02"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x5f\x41a\xff", "indefinite"),
        (b"\xc2\x41\x01", "tags"),
        (b"\xfb" + b"\0" * 8, "float"),
        (b"\x5b" + (1 << 63).to_bytes(8, "big"), "runs past the end"),
        (b"\x9b" + (1 << 60).to_bytes(8, "big"), "cannot fit"),
        (b"\xbb" + (1 << 60).to_bytes(8, "big"), "cannot fit"),
        (b"\xa2\x61a\x01\x61a\x02", "duplicate key"),
        (b"\xa1\x01\x02", "keys must be text"),
        (b"\x01\x02", "trailing"),
        (b"\x62\xff\xfe", "not utf-8"),
        (b"\x81" * 40 + b"\x01", "nested deeper"),
        (b"\x1c", "reserved"),
        (b"", "runs past the end"),
    ],
)
def test_malformed_input_is_refused(data, reason):
    with pytest.raises(ParseError, match=reason):
        cbor.decode(data)


def test_size_is_bounded():
    with pytest.raises(ParseError, match="larger than"):
        cbor.decode(cbor.encode(b"x" * 100), max_size=50)


def test_encode_refuses_what_it_cannot_write():
    for bad in (1.5, {1: 2}, 1 << 64, object()):
        with pytest.raises(ValueError):
            cbor.encode(bad)
