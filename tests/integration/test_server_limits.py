"""ServerLimits against slow and greedy clients: a real PrpcServer on loopback, small limits.

No test asserts on durations: a slow client keeps going for far longer than its limit (with a
generous deadline) and the test asserts that the server closed the connection before it gave up.
"""

from __future__ import annotations

import asyncio
import json
import resource
import ssl
from collections import Counter

import pytest
from google.protobuf.empty_pb2 import Empty

from pydstack.crypto.certs import CertRequest, cert_pem, generate_p256_key, issue_cert, key_pem
from pydstack.rpc.http1 import Http1Server
from pydstack.rpc.limits import FD_RESERVE, ServerLimits, connection_cap, raise_nofile_limit
from pydstack.rpc.proto import vmm_rpc_pb2 as pb
from pydstack.rpc.server import CallContext, PrpcServer, PrpcService

from .slow_client import PATIENCE, closed_while, read_response, request

VMM = pb.DESCRIPTOR.services_by_name["Vmm"]


class Impl:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.gate = asyncio.Event()
        self.gate.set()

    async def CreateVm(self, req: pb.VmConfiguration, ctx: CallContext) -> pb.Id:
        self.calls["CreateVm"] += 1
        return pb.Id(id=req.name)

    async def Version(self, req: Empty, ctx: CallContext) -> pb.VersionResponse:
        self.calls["Version"] += 1
        await self.gate.wait()
        return pb.VersionResponse(version="v")


@pytest.fixture(params=["aiohttp", "http1"])
def kind(request):
    """the server under test: aiohttp's, or the lean HTTP/1.1 one (the same limits)."""
    return request.param


async def start(
    limits: ServerLimits, tls: bool = False, kind: str = "aiohttp"
) -> tuple[PrpcServer | Http1Server, Impl, int]:
    impl = Impl()
    srv = PrpcServer(limits=limits) if kind == "aiohttp" else Http1Server(limits=limits)
    srv.mount(PrpcService(VMM, impl, prefix="/prpc", get_methods=frozenset({"Version"})))
    if not tls:
        return srv, impl, await srv.listen_tcp("127.0.0.1", 0)
    key = generate_p256_key()
    cert = issue_cert(
        CertRequest("localhost", alt_names=("localhost",), usage_server_auth=True),
        key.public_key(),
        key,
    )
    port = await srv.listen_tls("127.0.0.1", 0, cert_pem=cert_pem(cert), key_pem=key_pem(key))
    return srv, impl, port


async def test_slowloris_headers_are_cut_off(kind):
    srv, impl, port = await start(ServerLimits(header_timeout=0.5, idle_timeout=60), kind=kind)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = b"GET /prpc/Version HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 200
        chunks = [head[i : i + 1] for i in range(len(head))]
        assert len(chunks) * 0.2 > PATIENCE  # the client would still be sending at the deadline
        assert await closed_while(reader, writer, chunks)
        assert impl.calls == Counter()
        # a prompt client on a fresh connection is served
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(keep_alive=False))
        assert (await read_response(reader))[0] == 200
        writer.close()
    finally:
        await srv.close()


async def test_idle_keep_alive_connection_is_closed(kind):
    srv, impl, port = await start(ServerLimits(header_timeout=60, idle_timeout=0.5), kind=kind)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):  # keep-alive works while the client keeps asking
            writer.write(request())
            assert (await read_response(reader))[0] == 200
        assert await closed_while(reader, writer)
        assert impl.calls == Counter({"Version": 2})
    finally:
        await srv.close()


async def test_keep_alive_zero_closes_after_each_response(kind):
    srv, _, port = await start(ServerLimits(header_timeout=60, idle_timeout=0), kind=kind)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request())
        assert (await read_response(reader))[0] == 200
        assert await closed_while(reader, writer)
    finally:
        await srv.close()


async def test_tls_client_that_never_says_hello_is_dropped():
    srv, _, port = await start(
        ServerLimits(tls_handshake_timeout=0.5, header_timeout=60, idle_timeout=60), tls=True
    )
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(100):  # wait for the accept
            if srv.open_connections == 1:
                break
            await asyncio.sleep(0.05)
        assert srv.open_connections == 1  # counted while in the handshake
        assert await closed_while(reader, writer)
        for _ in range(100):
            if srv.open_connections == 0:
                break
            await asyncio.sleep(0.05)
        assert srv.open_connections == 0
        # a real TLS client is still served, and its requests still have a header timeout
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        writer.write(request(keep_alive=False))
        assert (await read_response(reader))[0] == 200
        writer.close()
    finally:
        await srv.close()


async def test_slow_body_is_cut_off(kind):
    srv, impl, port = await start(ServerLimits(header_timeout=60, body_timeout=0.5), kind=kind)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = json.dumps({"name": "x" * 300}).encode()
        writer.write(
            b"POST /prpc/CreateVm?json HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        chunks = [body[i : i + 1] for i in range(len(body))]
        assert len(chunks) * 0.2 > PATIENCE
        assert await closed_while(reader, writer, chunks)
        assert impl.calls == Counter()
    finally:
        await srv.close()


async def test_idle_connections_cannot_lock_out_a_client(kind):
    srv, impl, port = await start(ServerLimits(max_connections=50, header_timeout=60), kind=kind)
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(200):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            held.append(writer)
            assert srv.open_connections <= 50
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(keep_alive=False))
        assert (await read_response(reader))[0] == 200
        writer.close()
        assert srv.peak_connections == 50
        assert impl.calls == Counter({"Version": 1})
    finally:
        for w in held:
            w.close()
        await srv.close()


async def test_busy_server_refuses_rather_than_exceeding_the_cap(kind):
    srv, impl, port = await start(ServerLimits(max_connections=2, header_timeout=60), kind=kind)
    impl.gate.clear()  # Version blocks: both connections stay busy
    try:
        busy = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request(keep_alive=False))
            busy.append((reader, writer))
        for _ in range(200):
            if impl.calls["Version"] == 2:
                break
            await asyncio.sleep(0.02)
        assert impl.calls["Version"] == 2
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request(keep_alive=False))
        assert await closed_while(reader, writer)  # refused: closed without an answer
        assert impl.calls["Version"] == 2 and srv.peak_connections == 2
        impl.gate.set()
        for reader, writer in busy:
            assert (await read_response(reader))[0] == 200
            writer.close()
    finally:
        impl.gate.set()
        await srv.close()


def test_limits_config_and_file_limit():
    assert ServerLimits.from_table(None, where="server_limits") == ServerLimits()
    got = ServerLimits.from_table({"header_timeout": 3}, where="server_limits", keep_alive=5)
    assert got.header_timeout == 3 and got.idle_timeout == 5
    got = ServerLimits.from_table({"idle_timeout": 7}, where="x", keep_alive=5)
    assert got.idle_timeout == 7
    with pytest.raises(ValueError, match=r"unknown key server_limits\.max_conns"):
        ServerLimits.from_table({"max_conns": 1}, where="server_limits")
    with pytest.raises(ValueError, match=r"rpc\.server_limits: max_connections must be at least 1"):
        ServerLimits.from_table({"max_connections": 0}, where="rpc.server_limits")
    with pytest.raises(ValueError, match="header_timeout must be between"):
        ServerLimits(header_timeout=0)
    with pytest.raises(ValueError, match="body_timeout must be a number"):
        ServerLimits(body_timeout="30")  # type: ignore[arg-type]
    soft = raise_nofile_limit()
    assert soft == resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert connection_cap(1024, soft) <= max(16, (soft - FD_RESERVE) // 2)
    assert connection_cap(1024, 1000) == (1000 - FD_RESERVE) // 2
    assert connection_cap(10, 1000) == 10


def test_tls_listener_refuses_uvloop():
    """uvloop reads before start_tls could take a new connection over: refused at listen time."""
    import uvloop

    async def listen() -> None:
        srv = PrpcServer()
        key = generate_p256_key()
        cert = issue_cert(CertRequest("localhost", alt_names=("localhost",)), key.public_key(), key)
        try:
            await srv.listen_tls("127.0.0.1", 0, cert_pem=cert_pem(cert), key_pem=key_pem(key))
        finally:
            await srv.close()

    loop = uvloop.new_event_loop()
    try:
        with pytest.raises(RuntimeError, match="asyncio's event loop"):
            loop.run_until_complete(listen())
    finally:
        loop.close()
