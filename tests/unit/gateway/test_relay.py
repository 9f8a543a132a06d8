"""the relay and the poller on real loopback sockets: flow control that holds at most one chunk,
order (a PROXY header first, then what the client sent early), half-close, TLS records larger
than one read, close_notify, and a poller batch that never hands a forgotten descriptor's event
to anyone."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pydstack.gateway import relay as relay_mod
from pydstack.gateway.certstore import server_context, tls_version_range
from pydstack.gateway.poller import IN, Poller
from pydstack.gateway.relay import Relay, Tls

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integration"))
from gateway_env import make_pki


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """two ends of one loopback TCP connection (the app's, the gateway's)."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        a = socket.create_connection(lsock.getsockname())
        b, _ = lsock.accept()
    return a, b


@pytest.fixture
async def poller() -> AsyncIterator[Poller]:
    p = Poller(asyncio.get_running_loop())
    yield p
    p.close()


def make_relay(
    poller: Poller,
    client: socket.socket,
    backend: socket.socket,
    chunk: int = 64 * 1024,
    tls: Tls | None = None,
) -> tuple[Relay, list[Relay]]:
    closed: list[Relay] = []
    client.setblocking(False)
    backend.setblocking(False)
    relay = Relay(
        asyncio.get_running_loop(),
        poller,
        client,
        backend,
        tls=tls,
        chunk=chunk,
        shutdown_timeout=5,
        started=0.0,
        on_close=closed.append,
    )
    return relay, closed


async def recv_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    out = bytearray()
    while len(out) < n:
        got = await loop.sock_recv(sock, n - len(out))
        if not got:
            break
        out += got
    return bytes(out)


async def test_a_client_that_does_not_read_pauses_the_backend(poller: Poller) -> None:
    """bytes for a client that does not read pile up in the kernel, not here: the relay holds
    one chunk at most and stops reading the backend, whose sender then blocks; once the client
    reads, everything arrives in order."""
    c_app, c_gw = tcp_pair()
    b_gw, b_app = tcp_pair()
    relay, _ = make_relay(poller, c_gw, b_gw, chunk=16 * 1024)
    relay.start()
    loop = asyncio.get_running_loop()
    data = os.urandom(16 << 20)
    b_app.setblocking(False)
    sender = loop.create_task(loop.sock_sendall(b_app, data))
    await asyncio.sleep(0.5)
    assert not sender.done(), "the relay read everything the backend sent"
    assert relay._down is not None and len(relay._down) <= 16 * 1024
    got = await asyncio.wait_for(recv_exactly(c_app, len(data)), 30)
    await sender
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    for s in (c_app, b_app):
        s.close()


async def test_the_proxy_header_goes_first_then_early_bytes_in_order(poller: Poller) -> None:
    c_app, c_gw = tcp_pair()
    b_gw, b_app = tcp_pair()
    c_app.sendall(b"early ")
    await asyncio.sleep(0.05)
    relay, _ = make_relay(poller, c_gw, b_gw)
    relay.start(b"PROXY-HEADER ")
    c_app.sendall(b"late")
    want = b"PROXY-HEADER early late"
    assert await asyncio.wait_for(recv_exactly(b_app, len(want)), 5) == want
    b_app.sendall(b"answer")
    assert await asyncio.wait_for(recv_exactly(c_app, 6), 5) == b"answer"
    for s in (c_app, b_app):
        s.close()


async def test_plain_eof_is_passed_on_as_a_half_close(poller: Poller) -> None:
    """the client's EOF reaches the backend while the backend can still answer; the backend's
    close then ends the relay, once."""
    c_app, c_gw = tcp_pair()
    b_gw, b_app = tcp_pair()
    relay, closed = make_relay(poller, c_gw, b_gw)
    relay.start()
    c_app.sendall(b"request")
    c_app.shutdown(socket.SHUT_WR)
    assert await asyncio.wait_for(recv_exactly(b_app, 100), 5) == b"request"  # then EOF
    assert not relay.closed
    b_app.sendall(b"reply")
    b_app.close()
    assert await asyncio.wait_for(recv_exactly(c_app, 100), 5) == b"reply"
    await asyncio.sleep(0.05)
    assert closed == [relay] and relay.finished
    c_app.close()


def _tls_pair() -> tuple[ssl.SSLSocket, socket.socket, Tls]:
    """the client's TLS socket (refusing ragged EOFs), the gateway's socket and its handshaken
    :class:`Tls`."""
    pki = make_pki("relay.test")
    tls = Tls(server_context(pki.chain_pem, pki.key_pem, tls_version_range(["1.3"])))
    c_app, c_gw = tcp_pair()
    result: dict[str, ssl.SSLSocket] = {}

    def client() -> None:
        result["c"] = pki.client_context().wrap_socket(
            c_app, server_hostname="x.relay.test", suppress_ragged_eofs=False
        )

    t = threading.Thread(target=client)
    t.start()
    while True:
        try:
            tls.obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            c_gw.sendall(tls.out.read())
            tls.inc.write(c_gw.recv(65536))
    c_gw.sendall(tls.out.read())
    t.join()
    return result["c"], c_gw, tls


def read_to_close_notify(c_tls: ssl.SSLSocket) -> bytes:
    """what the client reads until a clean end (SSLEOFError without close_notify)."""
    out = b""
    while chunk := c_tls.recv(100):
        out += chunk
    return out


@pytest.fixture(params=["c-session", "ssl-object"])
def session_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """both kinds of TLS session the relay can run on: CPython's C object, and the public
    ``ssl.SSLObject`` (where the C one is out of reach)."""
    if request.param == "ssl-object":
        monkeypatch.setattr(relay_mod, "C_SESSIONS", False)
    return str(request.param)


async def test_a_tls_record_larger_than_one_read_is_relayed_whole(
    poller: Poller, session_kind: str
) -> None:
    """OpenSSL hands out one record in pieces of the read size; what it keeps has no readiness
    event, so the relay reads on while it holds some."""
    c_tls, gw, tls = await asyncio.to_thread(_tls_pair)
    assert isinstance(tls.obj, ssl.SSLObject | relay_mod._Unwrapping) == (
        session_kind == "ssl-object"
    )
    b_gw, b_app = tcp_pair()
    relay, _ = make_relay(poller, gw, b_gw, chunk=1000, tls=tls)
    relay.start()
    payload = os.urandom(16000)  # one TLS record
    await asyncio.to_thread(c_tls.sendall, payload)
    assert await asyncio.wait_for(recv_exactly(b_app, len(payload)), 5) == payload
    b_app.close()
    c_tls.close()


async def test_the_backends_close_ends_tls_with_close_notify(
    poller: Poller, session_kind: str
) -> None:
    """a client that refuses ragged EOFs sees a clean end: the relay sends close_notify after
    the last bytes."""
    c_tls, gw, tls = await asyncio.to_thread(_tls_pair)
    b_gw, b_app = tcp_pair()
    relay, closed = make_relay(poller, gw, b_gw, tls=tls)
    relay.start()
    b_app.sendall(b"last words")
    b_app.close()

    assert (
        await asyncio.wait_for(asyncio.to_thread(read_to_close_notify, c_tls), 5) == b"last words"
    )
    assert closed == [relay]
    c_tls.close()


class _CountingSocket(socket.socket):
    """a real socket that counts its sends with data."""

    sends = 0

    def send(self, data, flags=0):  # type: ignore[no-untyped-def,override]
        if len(data):
            self.sends += 1
        return super().send(data, flags)


async def test_the_backends_last_bytes_and_close_notify_leave_in_one_write(poller: Poller) -> None:
    """a backend that answers and closes at once (an HTTP/1.0 or `Connection: close` answer):
    its FIN is seen with its last bytes, so they and the close_notify go out in one write, not
    a write and then another wake-up for the EOF."""
    c_tls, gw, tls = await asyncio.to_thread(_tls_pair)
    counted = _CountingSocket(fileno=gw.detach())
    b_gw, b_app = tcp_pair()
    b_app.sendall(b"the answer")
    b_app.close()
    await asyncio.sleep(0.05)  # the FIN is in
    relay, closed = make_relay(poller, counted, b_gw, tls=tls)
    relay.start()

    got = await asyncio.wait_for(asyncio.to_thread(read_to_close_notify, c_tls), 5)
    assert got == b"the answer"
    assert closed == [relay] and relay.finished
    assert counted.sends == 1
    c_tls.close()


async def test_a_plain_backends_close_waits_for_what_the_client_has_not_taken(
    poller: Poller,
) -> None:
    """the backend's answer and its FIN are both in when the relay reads, and the client cannot
    take the whole answer yet: the EOF is passed on only after the client has it all."""
    with socket.socket() as lsock:  # a client with a small window from the start
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        c_app = socket.socket()
        c_app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c_app.connect(lsock.getsockname())
        c_gw, _ = lsock.accept()
    c_gw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b_gw, b_app = tcp_pair()
    data = os.urandom(48 * 1024)  # more than the client side holds, less than one read
    b_app.sendall(data)
    b_app.close()
    await asyncio.sleep(0.05)  # answer and FIN are in
    relay, _ = make_relay(poller, c_gw, b_gw, chunk=64 * 1024)
    relay.start()
    await asyncio.sleep(0.05)
    assert relay._down is not None, "the client took it all: nothing was held"
    got = await asyncio.wait_for(recv_exactly(c_app, len(data) + 1), 10)  # then the EOF
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    c_app.close()


async def test_a_client_that_does_not_take_tls_answers_is_not_read(poller: Poller) -> None:
    """what reading a client makes OpenSSL say (a KeyUpdate answer) waits behind bytes the
    client has not taken: the client is read no more until it takes them (so a client sending
    KeyUpdate requests without reading cannot pile up answers here), then read again."""
    c_tls, gw, tls = await asyncio.to_thread(_tls_pair)
    b_gw, b_app = tcp_pair()
    relay, _ = make_relay(poller, gw, b_gw, tls=tls)
    relay.start()
    loop = asyncio.get_running_loop()
    b_app.setblocking(False)
    sender = loop.create_task(loop.sock_sendall(b_app, os.urandom(16 << 20)))
    await asyncio.sleep(0.5)
    assert relay._down is not None and relay._c_mask & IN  # held bytes, the client still read
    tls.obj.write(b"answer")  # a record OpenSSL queued, as after a KeyUpdate request
    relay._flush_tls(tls)
    assert not relay._c_mask & IN
    sender.cancel()
    await asyncio.to_thread(_read_until, c_tls, b"answer")
    for _ in range(200):
        if relay._c_mask & IN:
            break
        await asyncio.sleep(0.01)
    assert relay._c_mask & IN
    relay.abort()
    b_app.close()
    c_tls.close()


def _read_until(sock: ssl.SSLSocket, mark: bytes) -> None:
    tail = b""
    while mark not in tail:
        chunk = sock.recv(1 << 16)
        assert chunk, "the stream ended before the mark"
        tail = tail[-len(mark) :] + chunk


async def test_a_forgotten_descriptor_gets_no_event_of_the_same_batch(poller: Poller) -> None:
    """both sockets are readable in one wake-up; the first handler forgets and closes the other
    and a new socket takes its number at once: the rest of the batch does not hand the old
    socket's event to the new one's handler."""
    pairs = [socket.socketpair() for _ in range(2)]
    for a, b in pairs:
        a.sendall(b"x")
        b.setblocking(False)
    calls: list[str] = []
    fresh: list[socket.socket] = []
    done = asyncio.get_running_loop().create_future()

    def first(mine: socket.socket, other: socket.socket) -> None:
        calls.append("first")
        number = other.fileno()
        poller.forget(number)
        other.close()
        new, peer = socket.socketpair()  # connected, nothing to read on it
        fresh.extend((new, peer))
        assert new.fileno() == number  # the lowest free number is the one just closed
        poller.set(number, IN, lambda ev: calls.append("stale event"))
        poller.forget(mine.fileno())
        done.set_result(None)

    a0, b0 = pairs[0][1], pairs[1][1]
    poller.set(b0.fileno(), IN, lambda ev: first(b0, a0) if not calls else None)
    poller.set(a0.fileno(), IN, lambda ev: first(a0, b0) if not calls else None)
    await asyncio.wait_for(done, 5)
    await asyncio.sleep(0.05)
    assert calls == ["first"]
    poller.forget(fresh[0].fileno())
    for s in fresh:
        s.close()
    for a, b in pairs:
        a.close()
        b.close()
