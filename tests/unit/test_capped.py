"""`read_capped`: a stream up to a cap, paid for by its own size."""

from __future__ import annotations

import asyncio
import gzip
import io

import pytest

from pydstack.types.capped import CHUNK, read_capped, read_capped_stream
from tests.peak import allocation_peak


class _Trickle(io.RawIOBase):
    """a stream that hands out at most 7 bytes per read, as a socket or a pipe may."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = 7 if n < 0 else min(n, 7)
        out, self._data = self._data[:n], self._data[n:]
        return out


@pytest.mark.parametrize("size", [0, 1, 99, 100, 101, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK])
def test_reads_up_to_one_past_the_cap(size):
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    for cap in (0, 100, CHUNK, 2 * CHUNK):
        got = read_capped(io.BytesIO(data), cap)
        assert got == data[: cap + 1]
    assert read_capped(_Trickle(data), 100) == data[:101]


def test_a_gzip_stream_and_a_negative_cap():
    packed = gzip.compress(b"z" * 50_000)
    with gzip.GzipFile(fileobj=io.BytesIO(packed)) as f:
        assert read_capped(f, 16 * 1024) == b"z" * (16 * 1024 + 1)
    with pytest.raises(ValueError, match="negative"):
        read_capped(io.BytesIO(b""), -1)


def test_a_small_file_under_a_large_cap_costs_its_size(tmp_path):
    path = tmp_path / "small"
    path.write_bytes(b"x" * 300)
    setup = f"from pydstack.types.capped import read_capped\npath = {str(path)!r}"
    capped = allocation_peak(setup, "with open(path, 'rb') as f: read_capped(f, 1 << 26)")
    plain = allocation_peak(setup, "with open(path, 'rb') as f: f.read((1 << 26) + 1)")
    assert plain > 1 << 26  # what the cap cost before
    assert capped < 2 * CHUNK


async def test_a_stream_that_hands_out_what_has_arrived_is_read_to_its_end_or_cap():
    """asyncio's and aiohttp's `read(n)` return what has arrived, not n bytes: one read of a
    body that came in pieces was its first piece."""
    data = bytes(range(256)) * 1000

    def stream() -> asyncio.StreamReader:
        """`data` arriving in 1000-byte pieces, one per turn of the loop."""
        r = asyncio.StreamReader()

        async def arrive() -> None:
            for i in range(0, len(data), 1000):
                r.feed_data(data[i : i + 1000])
                await asyncio.sleep(0)
            r.feed_eof()

        tasks.append(asyncio.get_running_loop().create_task(arrive()))
        return r

    tasks: list[asyncio.Task[None]] = []

    one = await stream().read(len(data) + 1)
    assert len(one) < len(data)  # what a single read gave
    assert await read_capped_stream(stream(), len(data)) == data
    assert await read_capped_stream(stream(), 5000) == data[:5001]
    assert await read_capped_stream(stream(), 0) == data[:1]
    with pytest.raises(ValueError, match="negative"):
        await read_capped_stream(stream(), -1)
    for t in tasks:
        t.cancel()
