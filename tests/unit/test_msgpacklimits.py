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
            assert "too long" in str(e), e
        """,
    )
    assert peak < 64 * len(data)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x91" * 40 + b"\xc0", "nested deeper than 32"),
        (b"\x92\x01", "array of 2 items is too long"),
        (b"\x92\x01\xc4\x05ab", "malformed"),  # bin claims 5 bytes, 2 follow
        (b"\x01\x02", "1 trailing bytes"),
        (b"\x81\x01\x02", "keys must be strings"),
        (b"\xd4\x01\x00", "malformed"),  # an extension type
        (b"\xc1", "malformed"),  # never used
        (b"", "truncated"),
        (b"\xdf\x00\x00\x04\x01" + b"\xa1a\x01" * 1025, "too long"),
    ],
)
def test_every_refusal_is_a_msgpack_error(data: bytes, why: str):
    with pytest.raises(MsgpackError, match=why):
        msgpacklimits.loads(data)
