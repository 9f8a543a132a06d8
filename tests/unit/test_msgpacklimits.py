"""msgpack from a peer: counts bounded by the bytes left before anything is allocated (a
fuzzing finding: nested array headers made msgpack preallocate 80 MB from 3 KB)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydstack.types import msgpacklimits
from pydstack.types.msgpacklimits import MsgpackError
from tests.peak import allocation_peak

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
    st.text(max_size=20), st.binary(max_size=20),
)  # fmt: skip
DOCS = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=30,
)
#: an array claiming 65535 items, nested: msgpack itself allocates 512 KiB per header
NESTED_HEADERS = b"\x81\xa1a" + b"\xdc\xff\xff" * 1000


@settings(max_examples=500, deadline=None)
@given(DOCS)
def test_documents_decode_as_msgpack_decodes_them(doc):
    data = msgpack.packb(doc, use_bin_type=True)
    assert msgpacklimits.loads(data) == msgpack.unpackb(data, raw=False)


_CALLS = {
    "loads": "from pydstack.types.msgpacklimits import loads as fn",
    "decode_versioned": "from pydstack.attest.attestation import decode_versioned as fn",
    "AppInfo.from_msgpack": (
        "from pydstack.attest.identity import AppInfo; fn = AppInfo.from_msgpack"
    ),
}


@pytest.mark.parametrize("name", sorted(_CALLS))
def test_counts_beyond_the_input_are_refused_before_allocation(name):
    data = NESTED_HEADERS if name != "AppInfo.from_msgpack" else NESTED_HEADERS[3:]
    peak = allocation_peak(
        f"""
        {_CALLS[name]}
        data = {data!r}
        """,
        """
        try:
            fn(data)
            raise SystemExit("accepted")
        except ValueError as e:
            assert "truncated" in str(e), e
        """,
    )
    assert peak < 64 * len(data)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x91" * 40 + b"\xc0", "nested deeper than 32"),
        (b"\x92\x01", "truncated"),  # an array of 2 items with 1 there
        (b"\x92\x01\xc4\x05ab", "truncated"),  # bin claims 5 bytes, 2 follow
        (b"\x01\x02", "1 trailing bytes"),
        (b"\x81\x01\x02", "keys must be strings"),
        (b"\xd4\x01\x00", "malformed"),  # an extension type
        (b"\xc1", "malformed"),  # never used
        (b"", "truncated"),
        (b"\xdf\x00\x00\x04\x01" + b"\xa1a\x01" * 1025, "map too long"),
        (b"\xdd\x00\x01\x00\x01" + b"\x01" * 65537, "array too long"),
        (b"\x81\x01\x90", "keys must be strings"),  # an int key
        (b"\x81\xc4\x01a\x90", "keys must be strings"),  # a bin key
        (b"\x91\xc7\x00\x05", "extension types"),  # an empty ext
        (b"\x91" * 5000 + b"\xc0", "malformed: StackError"),  # beyond msgpack's own stack
    ],
)
def test_every_refusal_is_a_msgpack_error(data: bytes, why: str):
    with pytest.raises(MsgpackError, match=why):
        msgpacklimits.loads(data)


def _u8(v: int, *, wide: bool) -> bytes:
    """one uint8 item: a fixint, or 0xcc and the byte (as encoders write 128..255, and as a
    non-canonical encoder may write any of them when `wide`)."""
    return bytes([0xCC, v]) if v >= 0x80 or wide else bytes([v])


def _array_header(n: int) -> bytes:
    return bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")


BYTE_VALUES = st.lists(
    st.one_of(st.integers(0, 255), st.sampled_from([0x00, 0x7F, 0x80, 0xCC, 0xFF])),
    max_size=300,
)


@settings(max_examples=120, deadline=None)
@given(BYTE_VALUES, st.lists(st.booleans(), min_size=300, max_size=300), st.booleans())
def test_byte_arrays_decode_as_msgpack_decodes_them(values, wide, nested):
    # upstream's serde writes Vec<u8> as an array of uint8 items; long ones take a faster path
    body = b"".join(_u8(v, wide=w) for v, w in zip(values, wide, strict=False))
    data = _array_header(len(values)) + body
    if nested:  # inside a map, followed by another item the walker must still find
        data = b"\x82\xa1q" + data + b"\xa1n\x05"
    expected = msgpack.unpackb(data, raw=False)
    assert msgpacklimits.loads(data) == expected
    assert (expected["q"] if nested else expected) == values


@pytest.mark.parametrize(
    ("tail", "why"),
    [
        (b"\x01" * 19, "truncated"),  # one item short
        (b"\x01" * 19 + b"\xcc", "truncated"),  # the last item's byte is missing
        (b"\x01" * 20 + b"\x02", "1 trailing bytes"),
    ],
)
def test_byte_arrays_cut_short_or_overlong_are_refused(tail: bytes, why: str):
    with pytest.raises(MsgpackError, match=why):
        msgpacklimits.loads(b"\xdc\x00\x14" + tail)


def test_arrays_with_other_items_are_read_item_by_item():
    items = [*range(20), "s", 300, -1, [1, 2], None, *range(200, 220)]
    data = msgpack.packb(items)
    assert msgpacklimits.loads(data) == items


def test_nesting_up_to_the_limit_is_accepted():
    assert msgpacklimits.loads(b"\x91" * 32 + b"\xc0") is not None
    assert msgpacklimits.loads(b"\x81\xa1k" * 4 + b"\x01", max_depth=4) == {
        "k": {"k": {"k": {"k": 1}}}
    }
    with pytest.raises(MsgpackError, match="deeper than 4"):
        msgpacklimits.loads(b"\x81\xa1k" * 5 + b"\x01", max_depth=4)
