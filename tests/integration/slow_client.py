"""a raw HTTP client that is slow on purpose, to show servers closing on it."""

from __future__ import annotations

import asyncio

#: how long a slow client keeps trying; every limit in the tests is far below it
PATIENCE = 15.0


def request(path: str = "/prpc/Version", keep_alive: bool = True) -> bytes:
    conn = "" if keep_alive else "Connection: close\r\n"
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{conn}\r\n".encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    length = next(
        int(v) for k, _, v in (h.partition(":") for h in lines) if k.lower() == "content-length"
    )
    return int(lines[0].split()[1]), await reader.readexactly(length)


def eof_waiter(reader: asyncio.StreamReader) -> asyncio.Future[bytes]:
    return asyncio.ensure_future(reader.read())


async def closed_while(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter | None = None,
    chunks: list[bytes] | None = None,
    interval: float = 0.2,
) -> bool:
    """send `chunks` one per `interval` (or just wait up to PATIENCE); True as soon as the
    server closes the connection, False if it is still open when the client gives up."""
    closed = eof_waiter(reader)
    steps = chunks if chunks is not None else [b""] * int(PATIENCE / interval)
    try:
        for chunk in steps:
            if closed.done():
                return True
            if chunk and writer is not None:
                try:
                    writer.write(chunk)
                    await writer.drain()
                except ConnectionError:
                    return True
            await asyncio.wait([closed], timeout=interval)
        return closed.done()
    finally:
        if not closed.done():
            closed.cancel()
        elif not closed.cancelled():
            closed.exception()  # a reset counts as closed: retrieve it
        if writer is not None:
            writer.close()
