"""reading a stream up to a size cap without paying for the cap.

`f.read(cap + 1)` on a buffered file, an HTTP response or a gzip stream allocates a buffer of
the cap before it knows how much there is: a 300-byte state file under a 16 MiB cap costs
16 MiB. `read_capped` reads in chunks instead, so a stream costs its own size (twice, at the
join) and never more than the cap plus one chunk. `read_capped_stream` is the same for an
asyncio or aiohttp stream, whose `read(n)` returns what has arrived so far, not all of it.
"""

from __future__ import annotations

from typing import Protocol

#: bytes asked for per read: a page-friendly size that keeps small files to one call
CHUNK = 64 * 1024


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class AsyncReadable(Protocol):
    async def read(self, n: int = -1, /) -> bytes: ...


def read_capped(f: Readable, cap: int) -> bytes:
    """at most `cap + 1` bytes of `f` (so a caller can tell "over the cap" by the length),
    read in chunks of at most `CHUNK` until the stream ends or the cap is passed."""
    if cap < 0:
        raise ValueError("cap must not be negative")
    parts: list[bytes] = []
    got = 0
    while got <= cap:
        part = f.read(min(CHUNK, cap + 1 - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def read_capped_stream(f: AsyncReadable, cap: int) -> bytes:
    """`read_capped` for a stream read with ``await f.read(n)``: at most `cap + 1` bytes, read
    until the stream ends (``b""``) or the cap is passed."""
    if cap < 0:
        raise ValueError("cap must not be negative")
    parts: list[bytes] = []
    got = 0
    while got <= cap:
        part = await f.read(min(CHUNK, cap + 1 - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)
