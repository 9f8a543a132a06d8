"""the lean HTTP/1.1 server against hostile and unusual clients: raw bytes on loopback.

What it shares with the aiohttp server (prpc modes, the guard, the limits) is tested on both in
test_rpc_prpc.py, test_rpc_guard.py and test_server_limits.py; this file covers its own parsing:
bounds, duplicated fields, framing errors, pipelining order, 100-continue and upgrades.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
from google.protobuf.empty_pb2 import Empty

from pydstack.rpc.guard import Refusal, RequestGuard, RequestLike
from pydstack.rpc.http1 import MAX_HEAD, MAX_HEADERS, Http1Server, HttpRequest
from pydstack.rpc.proto import vmm_rpc_pb2 as pb
from pydstack.rpc.server import Answer, CallContext, PrpcService

VMM = pb.DESCRIPTOR.services_by_name["Vmm"]


class Impl:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.order: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def CreateVm(self, req: pb.VmConfiguration, ctx: CallContext) -> pb.Id:
        self.calls["CreateVm"] += 1
        self.order.append(req.name)
        if req.name == "slow":
            await self.gate.wait()
        return pb.Id(id=req.name)

    async def Version(self, req: Empty, ctx: CallContext) -> pb.VersionResponse:
        self.calls["Version"] += 1
        return pb.VersionResponse(version="v")

    async def Status(self, req: pb.StatusRequest, ctx: CallContext) -> pb.StatusResponse:
        async with asyncio.timeout(5):  # needs a current task, as aiohttp's client does
            await asyncio.sleep(0)
        return pb.StatusResponse(total=1)


@pytest.fixture(params=[False, True], ids=["tasks", "eager"])
async def served(request):
    impl = Impl()
    srv = Http1Server(max_body=1024, eager=request.param)
    srv.mount(PrpcService(VMM, impl, prefix="/prpc", get_methods=frozenset({"Version"})))

    async def echo(request: HttpRequest) -> Answer:
        return Answer(200, json.dumps({"len": len(request.body)}).encode(), "application/json")

    srv.route("POST", "/echo", echo)
    port = await srv.listen_tcp("127.0.0.1", 0)
    yield srv, impl, port
    await srv.close()


async def exchange(port: int, data: bytes, *, until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        if until_close:
            return await asyncio.wait_for(reader.read(), 30)
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    finally:
        writer.close()


def responses(raw: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in `raw` (content-length framed)."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        out.append((status, rest[:length]))
        raw = rest[length:]
    return out


def create(name: str, *, close: bool = False) -> bytes:
    body = json.dumps({"name": name}).encode()
    return (
        b"POST /prpc/CreateVm HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + (b"Connection: close\r\n" if close else b"")
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


async def test_pipelined_requests_are_answered_in_order(served):
    _srv, impl, port = served
    impl.gate.clear()  # the first request waits; the two behind it must not overtake it
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(create("slow") + create("b") + create("c", close=True))
    for _ in range(200):
        if impl.order:
            break
        await asyncio.sleep(0.01)
    assert impl.order == ["slow"]  # the others wait their turn
    impl.gate.set()
    raw = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert [json.loads(b)["id"] for _, b in responses(raw)] == ["slow", "b", "c"]
    assert impl.order == ["slow", "b", "c"]


@pytest.mark.parametrize(
    "header",
    [b"Host: 127.0.0.1\r\nHost: evil.example", b"Origin: http://127.0.0.1\r\nOrigin: http://x",
     b"Content-Type: application/json\r\nContent-Type: text/plain",
     b"Sec-Fetch-Site: same-origin\r\nSec-Fetch-Site: cross-site"],
)  # fmt: skip
async def test_a_second_copy_of_a_checked_header_is_refused(served, header):
    _srv, impl, port = served
    raw = await exchange(port, b"GET /prpc/Version HTTP/1.1\r\n" + header + b"\r\n\r\n")
    [(status, body)] = responses(raw)
    assert status == 400 and b"duplicate" in body
    assert impl.calls == Counter()


async def test_heads_are_bounded(served):
    _srv, impl, port = served
    long_url = b"GET /prpc/Version?" + b"a" * MAX_HEAD + b" HTTP/1.1\r\n\r\n"
    many = b"GET /prpc/Version HTTP/1.1\r\n" + b"X-A: b\r\n" * (MAX_HEADERS + 1) + b"\r\n"
    big_value = b"GET /prpc/Version HTTP/1.1\r\nX-A: " + b"b" * MAX_HEAD + b"\r\n\r\n"
    for data, what in ((long_url, b"too large"), (many, b"too many"), (big_value, b"too large")):
        [(status, body)] = responses(await exchange(port, data))
        assert status == 400 and what in body, body
    assert impl.calls == Counter()
    # a request just within the bounds is served
    ok = b"GET /prpc/Version HTTP/1.1\r\n" + b"X-A: b\r\n" * (MAX_HEADERS - 1) + b"\r\n"
    assert responses(await exchange(port, ok, until_close=False) + b"")[0][0] == 200


async def test_bodies_are_bounded_before_they_are_read(served):
    _srv, impl, port = served
    # refused from its content-length: the server answers without waiting for the body
    head = (
        b"POST /prpc/CreateVm HTTP/1.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    [(status, body)] = responses(await exchange(port, head))
    assert status == 400 and "request body too large (max 1024 bytes)" in json.loads(body)["error"]
    # a chunked body is refused as soon as it grows past the bound
    chunk = b"x" * 600
    chunked = (
        b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2
    )
    [(status, body)] = responses(await exchange(port, chunked))
    assert status == 413 and b"too large" in body
    # within the bound, chunked works
    ok = b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ok += b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk)
    [(status, body)] = responses(await exchange(port, ok))
    assert status == 200 and json.loads(body) == {"len": 600}
    assert impl.calls == Counter()


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /prpc/Version HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /prpc/Version HTTP/1.1\r\nX-A: b\r\n folded\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET /prpc/Version HTTP/1.1\r\nBad Header: x\r\n\r\n",
    ],
)
async def test_malformed_framing_is_a_400_and_a_close(served, data):
    _srv, impl, port = served
    [(status, body)] = responses(await exchange(port, data))
    assert status == 400, body
    assert impl.calls == Counter()


async def test_upgrades_and_connect_are_refused(served):
    _srv, impl, port = served
    upgrade = b"GET /prpc/Version HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    [(status, body)] = responses(await exchange(port, upgrade))
    assert status == 400 and b"upgrade" in body
    [(status, _)] = responses(await exchange(port, b"CONNECT a:443 HTTP/1.1\r\n\r\n"))
    assert status in (400, 405)
    assert impl.calls == Counter()


async def test_expect_continue_only_for_a_body_that_will_be_read(served):
    _srv, _impl, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"name": "x"}).encode()
    writer.write(
        b"POST /prpc/CreateVm HTTP/1.1\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(body)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    too_big = (
        b"POST /prpc/CreateVm HTTP/1.1\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n"
    )
    raw = await exchange(port, too_big)
    assert raw.startswith(b"HTTP/1.1 400") and b"100 Continue" not in raw


async def test_other_routes_and_methods(served):
    _srv, impl, port = served
    cases = [
        (b"GET /nowhere HTTP/1.1\r\nConnection: close\r\n\r\n", 404),
        (b"GET /echo HTTP/1.1\r\nConnection: close\r\n\r\n", 405),
        (b"DELETE /prpc/Version HTTP/1.1\r\nConnection: close\r\n\r\n", 405),
        (b"GET /prpc/CreateVm HTTP/1.1\r\nConnection: close\r\n\r\n", 405),  # not read-only
        (b"GET /prpc/Version HTTP/1.0\r\n\r\n", 200),  # 1.0 without keep-alive: answer, close
    ]
    for data, expected in cases:
        [(status, _)] = responses(await exchange(port, data))
        assert status == expected, data
    assert impl.calls == Counter({"Version": 1})


async def test_a_closed_client_does_not_disturb_the_server(served):
    srv, impl, port = served
    impl.gate.clear()
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(create("slow"))
    for _ in range(200):
        if impl.order:
            break
        await asyncio.sleep(0.01)
    writer.close()  # gone while its answer is being computed
    await asyncio.sleep(0.1)
    impl.gate.set()
    [(status, body)] = responses(await exchange(port, create("next", close=True)))
    assert status == 200 and json.loads(body)["id"] == "next"
    for _ in range(200):
        if srv.open_connections == 0:
            break
        await asyncio.sleep(0.01)
    assert srv.open_connections == 0


def _tls_cert() -> tuple[str, str]:
    from pydstack.crypto.certs import CertRequest, cert_pem, generate_p256_key, issue_cert, key_pem

    key = generate_p256_key()
    cert = issue_cert(
        CertRequest("localhost", alt_names=("localhost",), usage_server_auth=True),
        key.public_key(),
        key,
    )
    return cert_pem(cert), key_pem(key)


async def test_tls_client_that_never_says_hello_is_dropped():
    from pydstack.rpc.limits import ServerLimits

    from .slow_client import closed_while

    cert, key = _tls_cert()
    srv = Http1Server(limits=ServerLimits(tls_handshake_timeout=0.5, idle_timeout=60))
    srv.mount(PrpcService(VMM, Impl(), prefix="/prpc", get_methods=frozenset({"Version"})))
    port = await srv.listen_tls("127.0.0.1", 0, cert_pem=cert, key_pem=key)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await closed_while(reader, writer)
    finally:
        await srv.close()


def test_tls_on_uvloop_serves_every_connection():
    """the handshake is the loop's own: on uvloop no ClientHello is lost (aiohttp's start_tls
    path lost them, see test_server_limits.test_tls_listener_refuses_uvloop)."""
    import ssl

    import uvloop

    cert, key = _tls_cert()

    async def run() -> list[bytes]:
        impl = Impl()
        srv = Http1Server()
        srv.mount(PrpcService(VMM, impl, prefix="/prpc", get_methods=frozenset({"Version"})))
        port = await srv.listen_tls("127.0.0.1", 0, cert_pem=cert, key_pem=key)
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        heads = []
        try:
            for _ in range(20):  # a fresh connection each time
                r, w = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, ssl=ctx), 10
                )
                w.write(
                    b"GET /prpc/Version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                )
                heads.append((await asyncio.wait_for(r.read(), 10))[:12])
                w.close()
        finally:
            await srv.close()
        assert impl.calls["Version"] == 20
        return heads

    loop = uvloop.new_event_loop()
    try:
        assert loop.run_until_complete(run()) == [b"HTTP/1.1 200"] * 20
    finally:
        loop.close()


async def test_a_server_that_is_not_eager_runs_handlers_in_tasks():
    srv = Http1Server()
    srv.mount(PrpcService(VMM, Impl(), prefix="/prpc"))
    port = await srv.listen_tcp("127.0.0.1", 0)
    try:
        request = (
            b"POST /prpc/Status HTTP/1.1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: 2\r\n\r\n{}"
        )
        [(status, body)] = responses(await exchange(port, request))
        assert status == 200 and json.loads(body) == {
            "vms": [],
            "port_mapping_enabled": False,
            "total": 1,
        }
    finally:
        await srv.close()


class RaisingGuard(RequestGuard):
    """a guard with a bug: it raises on the request named `boom` (bad input never should)."""

    def check(self, request: RequestLike) -> Refusal | None:
        if "boom" in request.path:
            raise RuntimeError("a bug in the guard")
        return super().check(request)


@pytest.mark.parametrize("eager", [False, True], ids=["tasks", "eager"])
async def test_an_answer_that_raises_is_a_500_and_a_close_and_others_are_served(eager):
    srv = Http1Server(eager=eager, guard=RaisingGuard())
    srv.mount(PrpcService(VMM, Impl(), prefix="/prpc", get_methods=frozenset({"Version"})))
    port = await srv.listen_tcp("127.0.0.1", 0)
    try:
        get = b"GET /prpc/%s HTTP/1.1\r\nHost: localhost\r\n\r\n"
        # pipelined: the one before is answered, the failing one is a 500, then the close
        raw = await asyncio.wait_for(
            exchange(port, get % b"Version" + get % b"boom" + get % b"Version"), 10
        )
        assert [s for s, _ in responses(raw)] == [200, 500]
        assert b"internal error" in raw
        close = b"GET /prpc/Version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        [(status, _)] = responses(await exchange(port, close))
        assert status == 200
    finally:
        await srv.close()
