"""the prpc client's HTTP/1.1 against scripted servers: how answers are framed (length, chunks,
end of stream), keep-alive and the replacement of a connection the server dropped while idle,
and hostile answers (oversized, malformed, cut short) refused with RpcError, bounded before
anything large is read."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from google.protobuf.empty_pb2 import Empty

from pydstack.rpc import client as client_mod
from pydstack.rpc.client import PrpcClient
from pydstack.rpc.errors import RpcError
from pydstack.rpc.proto import guest_api_pb2 as gpb

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return head


class Scripted:
    """a TCP server running `script` on each connection; counts connections and requests."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def _on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._on, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()


def _answer(body: bytes, *, status: str = "200 OK", extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


INFO = b'{"version": "x"}'


async def _call(base: str, **kw: object) -> gpb.GuestInfo:
    async with PrpcClient(base, prefix="/api", **kw) as c:  # type: ignore[arg-type]
        return await c.call("Info", Empty(), gpb.GuestInfo)


async def test_a_kept_alive_connection_serves_later_calls():
    srv = None

    async def keep(reader, writer):
        while True:
            srv.heads.append(await _read_request(reader))
            writer.write(_answer(INFO))
            await writer.drain()

    srv = Scripted(keep)
    async with srv as base, PrpcClient(base, prefix="/api") as c:
        for _ in range(3):
            assert (await c.call("Info", Empty(), gpb.GuestInfo)).version == "x"
    assert srv.connections == 1 and len(srv.heads) == 3
    assert srv.heads[0].startswith(b"POST /api/Info?json HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:" in srv.heads[0]


async def test_a_connection_dropped_while_idle_is_replaced_once():
    async def one_then_close(reader, writer):
        await _read_request(reader)
        writer.write(_answer(INFO))
        await writer.drain()
        # the server's idle timeout: closes without a word

    srv = Scripted(one_then_close)
    async with srv as base, PrpcClient(base, prefix="/api") as c:
        await c.call("Info", Empty(), gpb.GuestInfo)
        await asyncio.sleep(0.05)
        assert (await c.call("Info", Empty(), gpb.GuestInfo)).version == "x"
    assert srv.connections == 2


async def test_a_new_connection_closed_without_an_answer_is_an_os_error():
    async def mute(reader, writer):
        await _read_request(reader)

    async with Scripted(mute) as base:
        with pytest.raises(ConnectionResetError):
            await _call(base)


async def test_chunked_and_end_of_stream_bodies():
    async def chunked(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (INFO[:5], INFO[5:]):
            writer.write(b"%x;ext=1\r\n%s\r\n" % (len(part), part))
        writer.write(b"0\r\nX-Trailer: 1\r\n\r\n")
        await writer.drain()

    async def until_close(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + INFO)
        await writer.drain()
        writer.close()

    for script in (chunked, until_close):
        async with Scripted(script) as base:
            assert (await _call(base)).version == "x"


async def test_an_error_status_carries_the_servers_message():
    async def refuse(reader, writer):
        await _read_request(reader)
        writer.write(_answer(b'{"error": "no such vm"}', status="400 Bad Request"))
        await writer.drain()

    async with Scripted(refuse) as base:
        with pytest.raises(RpcError, match=r"^no such vm$"):
            await _call(base)


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.1 answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported transfer"),
        (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "broke off"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", "64 KiB"),
        (_answer(b"{not json"), "invalid response from Info"),
    ],
)
async def test_hostile_answers_are_refused(answer, why):
    async def send(reader, writer):
        await _read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    async with Scripted(send) as base:
        with pytest.raises(RpcError, match=why):
            await _call(base)


async def test_an_announced_body_over_the_bound_is_refused_before_it_is_read(monkeypatch):
    monkeypatch.setattr(client_mod, "MAX_RESPONSE_BODY", 1000)

    async def huge(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1001\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(5)  # never sends it: the client must not wait for it

    async with Scripted(huge) as base:
        with pytest.raises(RpcError, match="over the client's bound"):
            await _call(base, timeout=3)

    async def endless_chunks(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(20):
            writer.write(b"64\r\n" + b"a" * 100 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    async with Scripted(endless_chunks) as base:
        with pytest.raises(RpcError, match="over the client's bound"):
            await _call(base, timeout=3)


async def test_a_silent_server_times_out():
    async def silent(reader, writer):
        await _read_request(reader)
        await asyncio.sleep(5)

    async with Scripted(silent) as base:
        with pytest.raises(TimeoutError):
            await _call(base, timeout=0.3)


async def test_concurrent_calls_each_get_a_connection():
    async def slow(reader, writer):
        while True:
            await _read_request(reader)
            await asyncio.sleep(0.1)
            writer.write(_answer(INFO))
            await writer.drain()

    srv = Scripted(slow)
    async with srv as base, PrpcClient(base, prefix="/api") as c:
        got = await asyncio.gather(*(c.call("Info", Empty(), gpb.GuestInfo) for _ in range(4)))
        assert [g.version for g in got] == ["x"] * 4
        assert srv.connections == 4
        await c.call("Info", Empty(), gpb.GuestInfo)  # from the idle ones
        assert srv.connections == 4
