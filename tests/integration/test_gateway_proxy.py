"""the gateway's relay on loopback with real TLS clients and backends: terminate, passthrough,
h2, the gateway's own ids, PROXY protocol in and out, port policy, limits, custom domains and
bad input. No test asserts on durations: a timeout shows as the gateway closing a connection
that the client would have kept using."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time

import dns.message
import dns.rrset
import h2.config
import h2.connection
import h2.events
import pytest

from pydstack.gateway.app_address import AppAddressResolver
from pydstack.gateway.policy import OPEN_POLICY, PortPolicy
from pydstack.gateway.proxy_protocol import encode_v2, parse_proxy_header
from pydstack.gateway.routes import Instance, RouteSettings, RouteTable

from .gateway_env import DOMAIN, Backend, make_pki, proxy_config, start_proxy, tls_exchange

PATIENCE = 30.0


@pytest.fixture
def pki():
    return make_pki()


def table_with(*instances: Instance, **settings: int) -> RouteTable:
    t = RouteTable(RouteSettings(**settings))  # type: ignore[arg-type]
    for i in instances:
        t.upsert(i)
    t.set_handshakes({i.public_key: time.time() for i in instances})
    return t


def app(iid: str, app_id: str, policy: PortPolicy | None = OPEN_POLICY) -> Instance:
    return Instance(iid, app_id, "127.0.0.1", public_key=f"k-{iid}", reported_policy=policy)


async def closed_by_gateway(reader: asyncio.StreamReader) -> bool:
    """True when the gateway closes the connection (EOF or reset) within PATIENCE."""
    try:
        async with asyncio.timeout(PATIENCE):
            while await reader.read(65536):
                pass
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False
    return True


async def http_get(port: int, sni: str, pki, path: str = "/", method: str = "GET") -> bytes:
    req = f"{method} {path} HTTP/1.1\r\nhost: {sni}\r\n\r\n".encode()
    data, _ = await tls_exchange(port, sni, pki, req, read_until_eof=True)
    return data


async def backend_name(port: int, sni: str, pki) -> bytes:
    """one request to an http Backend through the proxy: the backend's name."""
    ctx = pki.client_context()
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni)
    try:
        w.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), PATIENCE)
        n = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
        return await r.readexactly(n)
    finally:
        w.close()


async def test_terminate_by_app_id_and_instance_id_reach_only_that_app(pki) -> None:
    a = await Backend("app-a", "http").start()
    b = await Backend("app-b", "http", host="127.0.0.2").start(a.port)
    inst_b = Instance("instb", "appb", "127.0.0.2", public_key="kb", reported_policy=OPEN_POLICY)
    table = table_with(app("insta", "appa"), inst_b)
    srv, port = await start_proxy(pki, table=table)
    try:
        # the same port on both apps' addresses: only the id decides
        assert await backend_name(port, f"appa-{a.port}.{DOMAIN}", pki) == b"app-a"
        assert await backend_name(port, f"insta-{a.port}.{DOMAIN}", pki) == b"app-a"
        assert await backend_name(port, f"appb-{a.port}.{DOMAIN}", pki) == b"app-b"
        assert await backend_name(port, f"instb-{a.port}.{DOMAIN}", pki) == b"app-b"
        # the backend got plaintext, not TLS
        assert a.seen().startswith(b"GET / HTTP/1.1")
    finally:
        await srv.close(0)
        await a.stop()
        await b.stop()


async def test_instance_id_resolves_before_app_id(pki) -> None:
    target = await Backend("by-instance", "http").start()
    other = await Backend("by-app", "http", host="127.0.0.3").start(target.port)
    # an instance whose id equals another app's id wins (upstream's order)
    t = table_with(
        app("shared", "x"),
        Instance("y1", "shared", "127.0.0.3", public_key="ky", reported_policy=OPEN_POLICY),
    )
    srv, port = await start_proxy(pki, table=t)
    try:
        assert await backend_name(port, f"shared-{target.port}.{DOMAIN}", pki) == b"by-instance"
        assert other.peers == 0
    finally:
        await srv.close(0)
        await target.stop()
        await other.stop()


async def test_passthrough_hands_the_tls_stream_to_the_app(pki) -> None:
    app_pki = make_pki(DOMAIN)  # the app's own certificate, from another CA
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    import os
    import tempfile

    with tempfile.NamedTemporaryFile("w", delete=False) as f:
        f.write(app_pki.chain_pem + app_pki.key_pem)
    server_ctx.load_cert_chain(f.name)
    os.unlink(f.name)

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read(100)
        w.write(b"app says " + data)
        await w.drain()
        w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    bport = server.sockets[0].getsockname()[1]
    srv, port = await start_proxy(pki, table=table_with(app("i1", "a1")))
    try:
        data, _ = await tls_exchange(
            port, f"a1-{bport}s.{DOMAIN}", app_pki, b"hi", read_until_eof=True
        )
        assert data == b"app says hi"
        # the gateway's own certificate is not what the client saw
        with pytest.raises(ssl.SSLCertVerificationError):
            await tls_exchange(port, f"a1-{bport}s.{DOMAIN}", pki, b"hi", read_until_eof=True)
    finally:
        await srv.close(0)
        server.close()


async def h2_backend(host: str = "127.0.0.1") -> tuple[asyncio.Server, int]:
    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        w.write(conn.data_to_send())
        while data := await r.read(65536):
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    path = dict(ev.headers)[b":path"]
                    body = b"h2 backend saw " + path
                    conn.send_headers(
                        ev.stream_id, [(":status", "200"), ("content-length", str(len(body)))]
                    )
                    conn.send_data(ev.stream_id, body, end_stream=True)
            w.write(conn.data_to_send())
            await w.drain()
        w.close()

    server = await asyncio.start_server(serve, host, 0)
    return server, server.sockets[0].getsockname()[1]


async def test_h2_mode_negotiates_h2_and_speaks_cleartext_h2_to_the_app(pki) -> None:
    server, bport = await h2_backend()
    srv, port = await start_proxy(pki, table=table_with(app("i1", "a1")))
    try:
        ctx = pki.client_context(["h2", "http/1.1"])
        r, w = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=f"a1-{bport}g.{DOMAIN}"
        )
        assert w.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(
            sid,
            [(":method", "GET"), (":path", "/hello"), (":scheme", "https"), (":authority", "a1")],
            end_stream=True,
        )
        w.write(conn.data_to_send())
        body = b""
        done = False
        while not done:
            data = await asyncio.wait_for(r.read(65536), PATIENCE)
            assert data
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(len(ev.data), ev.stream_id)
                if isinstance(ev, h2.events.StreamEnded):
                    done = True
            w.write(conn.data_to_send())
        assert body == b"h2 backend saw /hello"
        w.close()
        # the plain terminate mode advertises no ALPN
        _, alpn = await tls_exchange(port, f"a1-{bport}.{DOMAIN}", pki, b"", alpn=["h2"], expect=0)
        assert alpn is None
    finally:
        await srv.close(0)
        server.close()


async def test_gateway_and_health_ids(pki) -> None:
    async def app_info():
        return {"app_id": "gw-app"}

    async def acme_info():
        return {"account_uri": "https://acme/acct/1", "quoted_hist_keys": []}

    srv, port = await start_proxy(pki, app_info=app_info, acme_info=acme_info)
    try:
        gw = f"gateway.{DOMAIN}"
        assert (await http_get(port, gw, pki, "/health")).startswith(b"HTTP/1.1 200")
        idx = await http_get(port, gw, pki, "/.dstack/index")
        assert b'"paths": ["/index", "/app-info", "/acme-info"]' in idx
        assert b'"app_id": "gw-app"' in await http_get(port, gw, pki, "/.dstack/app-info")
        assert b"acct/1" in await http_get(port, gw, pki, "/acme-info")
        assert (await http_get(port, gw, pki, "/nope")).startswith(b"HTTP/1.1 404")
        assert (await http_get(port, gw, pki, "/health", "POST")).startswith(b"HTTP/1.1 405")
        assert (await http_get(port, f"health.{DOMAIN}", pki, "/")).startswith(b"HTTP/1.1 200")
        assert (await http_get(port, f"health.{DOMAIN}", pki, "/x")).startswith(b"HTTP/1.1 404")
        for bad in (f"gateway-443s.{DOMAIN}", f"gateway-8080.{DOMAIN}"):
            with pytest.raises((ConnectionError, ssl.SSLError)):
                await http_get(port, bad, pki, "/health")
    finally:
        await srv.close(0)


async def test_pp_header_synthesised_only_where_the_policy_asks(pki) -> None:
    b = await Backend("pp", "echo").start()
    pp = PortPolicy(True, {b.port: True})
    srv, port = await start_proxy(pki, table=table_with(app("withpp", "a1", pp), app("nopp", "a2")))
    try:
        data, _ = await tls_exchange(
            port, f"withpp-{b.port}.{DOMAIN}", pki, b"payload", expect=28 + 7
        )
        header, used = parse_proxy_header(data)  # type: ignore[misc]
        assert header.src is not None and header.src[0] == "127.0.0.1"
        assert header.dst == ("127.0.0.1", port)
        assert data[used:] == b"payload"
        data, _ = await tls_exchange(port, f"nopp-{b.port}.{DOMAIN}", pki, b"payload")
        assert data == b"payload"
    finally:
        await srv.close(0)
        await b.stop()


async def test_inbound_pp_is_required_and_forwarded(pki) -> None:
    b = await Backend("pp", "echo").start()
    pp = PortPolicy(False, {b.port: True})
    cfg = proxy_config(inbound_pp_enabled=True)
    srv, port = await start_proxy(pki, table=table_with(app("i1", "a1", pp)), config=cfg)
    try:
        v1 = b"PROXY TCP4 192.0.2.7 198.51.100.9 4000 443\r\n"
        data, _ = await tls_exchange(
            port, f"i1-{b.port}.{DOMAIN}", pki, b"x", prefix=v1, expect=28 + 1
        )
        assert data == encode_v2(("192.0.2.7", 4000), ("198.51.100.9", 443)) + b"x"
        # a stream without a header is closed
        with pytest.raises((ConnectionError, ssl.SSLError)):
            await tls_exchange(port, f"i1-{b.port}.{DOMAIN}", pki, b"x")
    finally:
        await srv.close(0)
        await b.stop()


async def test_port_policy_fails_closed_and_asks_for_the_policy(pki) -> None:
    b = await Backend("p", "echo").start()
    table = table_with(
        app("unknown", "a1", policy=None), app("strict", "a2", PortPolicy(True, {1: False}))
    )
    asked: list[str] = []
    table.on_policy_missing = asked.append
    srv, port = await start_proxy(pki, table=table)
    reasons: list[str] = []
    srv.on_refused = reasons.append
    try:
        for sni in (f"unknown-{b.port}.{DOMAIN}", f"strict-{b.port}.{DOMAIN}"):
            with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
                await tls_exchange(port, sni, pki, b"x")
        assert asked == ["unknown"]
        assert reasons == [f"port {b.port} denied by app port policy"] * 2
        assert b.peers == 0
        table.set_reported_policy("unknown", OPEN_POLICY)
        assert (await tls_exchange(port, f"unknown-{b.port}.{DOMAIN}", pki, b"x"))[0] == b"x"
    finally:
        await srv.close(0)
        await b.stop()


async def test_per_app_connection_limit(pki) -> None:
    b = await Backend("l", "echo").start()
    table = table_with(app("i1", "a1"), max_connections_per_app=1)
    srv, port = await start_proxy(pki, table=table)
    reasons: list[str] = []
    srv.on_refused = reasons.append
    try:
        ctx = pki.client_context()
        sni = f"a1-{b.port}.{DOMAIN}"
        r1, w1 = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni)
        w1.write(b"one")
        assert await r1.readexactly(3) == b"one"
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
            await tls_exchange(port, sni, pki, b"two")
        assert reasons == ["app connection limit exceeded: 1/1"]
        w1.close()
        await closed_by_gateway(r1)
        for _ in range(100):
            if table.connections("i1") == 0:
                break
            await asyncio.sleep(0.05)
        assert (await tls_exchange(port, sni, pki, b"three"))[0] == b"three"
    finally:
        await srv.close(0)
        await b.stop()


class StubResolver(AppAddressResolver):
    async def resolve(self, sni: str):  # type: ignore[override]
        from pydstack.gateway.app_address import AppAddressError

        raise AppAddressError(f"no app address for {sni}")


async def test_bad_input_is_closed_and_everyone_else_is_served(pki) -> None:
    from tests.unit.gateway.hello import built, openssl_hello, sni_ext

    b = await Backend("ok", "echo").start()
    srv, port = await start_proxy(pki, table=table_with(app("i1", "a1")), resolver=StubResolver())
    reasons: list[str] = []
    srv.on_refused = reasons.append
    hello = openssl_hello(f"a1-{b.port}.{DOMAIN}")
    bad_inputs = [
        openssl_hello(None),  # no sni
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n",  # not tls
        b"\x16\x03\x01\xff\xff" + b"\x00" * 64,  # garbage record
        hello[: len(hello) // 2],  # truncated, then EOF
        openssl_hello("app.unknown.example"),  # matches nothing (no txt record)
        openssl_hello(f"a-b-c.{DOMAIN}"),  # not the grammar
        openssl_hello(f"nobody-80.{DOMAIN}"),  # unknown id
        built(sni_ext((0, b"x" * 20 + b"\x00"))),  # a name that is no host name
    ]
    try:
        for data in bad_inputs:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(data)
            if data is hello[: len(hello) // 2]:
                w.write_eof()
            await w.drain()
            assert await closed_by_gateway(r), data[:40]
            w.close()
            # someone else is still served after each one
            assert (await tls_exchange(port, f"a1-{b.port}.{DOMAIN}", pki, b"ping"))[0] == b"ping"
        assert len(reasons) == len(bad_inputs)
        assert any("no sni found" in x for x in reasons)
        assert any("not a tls handshake record" in x for x in reasons)
        assert any("no app address" in x for x in reasons)
        assert any("app not found" in x for x in reasons)
        assert b.peers == len(bad_inputs)  # only the good connections reached the backend
    finally:
        await srv.close(0)
        await b.stop()


async def test_slowloris_and_idle_sockets_are_dropped_while_others_are_served(pki) -> None:
    from tests.unit.gateway.hello import openssl_hello

    b = await Backend("ok", "echo").start()
    cfg = proxy_config(timeouts={"handshake": "1s"})
    srv, port = await start_proxy(pki, table=table_with(app("i1", "a1")), config=cfg)
    try:
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(300)]
        hello = openssl_hello(f"a1-{b.port}.{DOMAIN}")
        r, w = await asyncio.open_connection("127.0.0.1", port)
        sent = 0
        gate = asyncio.Event()

        async def drip() -> None:
            nonlocal sent
            with contextlib.suppress(ConnectionError):
                for i in range(len(hello)):
                    if gate.is_set():
                        return
                    w.write(hello[i : i + 1])
                    await w.drain()
                    sent += 1
                    await asyncio.sleep(0.2)

        dripper = asyncio.ensure_future(drip())
        # others are served while the slow client and the idle sockets hang on
        for _ in range(5):
            assert (await tls_exchange(port, f"a1-{b.port}.{DOMAIN}", pki, b"hi"))[0] == b"hi"
        assert await closed_by_gateway(r)
        gate.set()
        await dripper
        assert sent < len(hello)  # closed before the hello was complete
        for ir, iw in idle:
            assert await closed_by_gateway(ir)
            iw.close()
        assert (await tls_exchange(port, f"a1-{b.port}.{DOMAIN}", pki, b"hi"))[0] == b"hi"
    finally:
        await srv.close(0)
        await b.stop()


async def test_idle_watchdog_closes_a_silent_relay(pki) -> None:
    b = await Backend("ok", "echo").start()
    cfg = proxy_config(timeouts={"idle": "1s"})
    srv, port = await start_proxy(pki, table=table_with(app("i1", "a1")), config=cfg)
    try:
        ctx = pki.client_context()
        r, w = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=f"a1-{b.port}.{DOMAIN}"
        )
        w.write(b"x")
        assert await r.readexactly(1) == b"x"
        assert await closed_by_gateway(r)
        assert not srv.relays
    finally:
        await srv.close(0)
        await b.stop()


async def test_tls_versions_are_enforced(pki) -> None:
    b = await Backend("ok", "echo").start()
    cfg = proxy_config(tls_versions=["1.2"])
    srv, port = await start_proxy(pki, table=table_with(app("i1", "a1")), config=cfg)
    try:
        sni = f"a1-{b.port}.{DOMAIN}"
        ctx12 = pki.client_context()
        ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
        _r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx12, server_hostname=sni)
        assert w.get_extra_info("ssl_object").version() == "TLSv1.2"
        w.close()
        ctx13 = pki.client_context()
        ctx13.minimum_version = ssl.TLSVersion.TLSv1_3
        # the gateway sends OpenSSL's alert before it closes: the client learns why
        with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
            await asyncio.open_connection("127.0.0.1", port, ssl=ctx13, server_hostname=sni)
    finally:
        await srv.close(0)
        await b.stop()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_clients_get_session_tickets_and_resume(pki, version: ssl.TLSVersion) -> None:
    """TLS 1.3 tickets leave with the first answer bytes rather than on their own; either way a
    client ends up with a ticket, and its next connection resumes (TLS 1.2 sends its ticket in
    the handshake's last flight)."""
    b = await Backend("ok", "http").start()
    cfg = proxy_config(tls_versions=["1.2", "1.3"])
    srv, port = await start_proxy(pki, table=table_with(app("i1", "a1")), config=cfg)
    sni = f"a1-{b.port}.{DOMAIN}"
    ctx = pki.client_context()
    ctx.minimum_version = ctx.maximum_version = version

    def one(session: ssl.SSLSession | None) -> tuple[bytes, ssl.SSLSession | None, bool]:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as raw,
            ctx.wrap_socket(raw, server_hostname=sni, session=session) as s,
        ):
            s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            answer = b""
            while b"ok" not in answer:
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
            return answer, s.session, s.session_reused

    try:
        answer, session, reused = await asyncio.to_thread(one, None)
        assert b"ok" in answer and not reused
        assert session is not None and session.has_ticket
        answer, _, reused = await asyncio.to_thread(one, session)
        assert b"ok" in answer and reused
    finally:
        await srv.close(0)
        await b.stop()


async def test_both_sides_of_a_relay_send_without_delay(pki) -> None:
    """Nagle off on the client's socket (inherited from the listener) and the backend's: a
    small answer is not held back waiting for an ACK; and no ACK of its own for the hello."""
    b = await Backend("ok", "echo").start()
    srv, port = await start_proxy(pki, table=table_with(app("i1", "a1")))
    ctx = pki.client_context()
    r, w = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=f"a1-{b.port}.{DOMAIN}"
    )
    try:
        w.write(b"ping")
        assert await asyncio.wait_for(r.readexactly(4), PATIENCE) == b"ping"
        (relay,) = srv.relays
        for sock in (relay.c, relay.b):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        # accepted sockets start in delayed-ACK mode: the ClientHello's ACK rides on the
        # server's flight instead of going out alone when the hello is read
        for lsock in srv._listeners:
            assert lsock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 0
    finally:
        w.close()
        await srv.close(0)
        await b.stop()


async def test_a_hello_in_before_the_accept_is_answered_by_the_accept(pki) -> None:
    """a ClientHello already in the socket when the gateway accepts it is read at once: the
    server's first flight leaves within the accept, not a loop round later."""
    from tests.unit.gateway.hello import openssl_hello

    b = await Backend("ok", "echo").start()
    srv, port = await start_proxy(pki, table=table_with(app("i1", "a1")))
    (lsock,) = srv._listeners
    srv._loop.remove_reader(lsock.fileno())  # the test accepts, by hand
    client = socket.create_connection(("127.0.0.1", port))
    try:
        client.sendall(openssl_hello(f"a1-{b.port}.{DOMAIN}"))
        time.sleep(0.1)  # the hello is in the gateway's socket
        srv._accept_ready(lsock)  # no loop round from here on
        client.settimeout(0.5)
        flight = client.recv(65536)
        assert flight[:1] == b"\x16"  # a handshake record: the ServerHello
    finally:
        client.close()
        await srv.close(0)
        await b.stop()


class TxtServer(asyncio.DatagramProtocol):
    def __init__(self, records: dict[str, str]) -> None:
        self.records = records
        self.queries: list[str] = []

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        q = dns.message.from_wire(data)
        resp = dns.message.make_response(q)
        name = q.question[0].name.to_text().rstrip(".")
        self.queries.append(name)
        if name in self.records:
            resp.answer.append(
                dns.rrset.from_text(name + ".", 60, "IN", "TXT", f'"{self.records[name]}"')
            )
        else:
            resp.set_rcode(dns.rcode.NXDOMAIN)
        self.transport.sendto(resp.to_wire(), addr)


async def test_custom_domain_through_txt_is_passed_through(pki) -> None:
    b = await Backend("custom", "echo").start()
    loop = asyncio.get_running_loop()
    dns_srv = TxtServer(
        {
            "_dstack-app-address.shop.example.org": f"a1:{b.port}",
            "_tapp-address.legacy.example.org": f"i1:{b.port}",
            "_dstack-app-address-wildcard.example.net": f"a1:{b.port}",
        }
    )
    transport, _ = await loop.create_datagram_endpoint(lambda: dns_srv, ("127.0.0.1", 0))
    dport = transport.get_extra_info("sockname")[1]
    resolver = AppAddressResolver(dns_servers=[f"127.0.0.1:{dport}"], timeout=5)
    srv, port = await start_proxy(pki, table=table_with(app("i1", "a1")), resolver=resolver)
    try:
        from tests.unit.gateway.hello import openssl_hello

        for sni in ("shop.example.org", "legacy.example.org", "any.example.net"):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            hello = openssl_hello(sni)
            w.write(hello)
            # passthrough: the app (an echo) gets the raw ClientHello
            assert await asyncio.wait_for(r.readexactly(len(hello)), PATIENCE) == hello
            w.close()
        assert await resolver.resolve("shop.example.org") == await resolver.resolve(
            "shop.example.org"
        )
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(openssl_hello("none.example.com"))
        assert await closed_by_gateway(r)
    finally:
        await srv.close(0)
        transport.close()
        await b.stop()


def _unanswering_port() -> tuple[socket.socket, list[socket.socket]]:
    """a listening port whose accept queue is full, so a new connection's SYN is dropped and its
    connect hangs (the listener and the connections that fill the queue)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    fillers: list[socket.socket] = []
    for _ in range(16):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(lsock.getsockname())
        fillers.append(s)
    # the last ones never connect: nobody accepts, and the queue holds one
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        with pytest.raises(OSError):
            probe.connect(lsock.getsockname())
    finally:
        probe.close()
    return lsock, fillers


async def test_setup_deadlines_close_stalled_connections_while_others_are_served(pki) -> None:
    """a backend that never answers the SYN, a client that stops after its ClientHello and one
    that never sends its PROXY header: each is closed by its deadline, counted as a timeout,
    while others are served throughout."""
    from tests.unit.gateway.hello import openssl_hello

    b = await Backend("ok", "echo").start()
    hole, fillers = _unanswering_port()
    table = table_with(app("i1", "a1"), app("h1", "hole"))
    cfg = proxy_config(timeouts={"handshake": "1s", "connect": "1s"})
    srv, port = await start_proxy(pki, table=table, config=cfg)
    pp_cfg = proxy_config(inbound_pp_enabled=True, timeouts={"pp_header": "1s"})
    pp_srv, pp_port = await start_proxy(pki, table=table_with(app("i1", "a1")), config=pp_cfg)
    reasons: list[str] = []
    srv.on_refused = pp_srv.on_refused = reasons.append
    ctx = pki.client_context()
    try:
        # the backend never connects (the client's handshake is done by then)
        hole_port = hole.getsockname()[1]
        r1, w1 = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=f"hole-{hole_port}.{DOMAIN}"
        )
        w1.write(b"waiting")
        # the client sends its hello, reads the server's flight and goes silent
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w2.write(openssl_hello(f"a1-{b.port}.{DOMAIN}"))
        assert await asyncio.wait_for(r2.read(1), PATIENCE)  # the ServerHello has come
        # no PROXY header ever
        r3, w3 = await asyncio.open_connection("127.0.0.1", pp_port)
        for _ in range(3):
            assert (await tls_exchange(port, f"a1-{b.port}.{DOMAIN}", pki, b"hi"))[0] == b"hi"
        for r in (r1, r2, r3):
            assert await closed_by_gateway(r)
        assert reasons == ["timeout"] * 3
        assert not srv._conns and not pp_srv._conns
        assert (await tls_exchange(port, f"a1-{b.port}.{DOMAIN}", pki, b"hi"))[0] == b"hi"
        for w in (w1, w2, w3):
            w.close()
    finally:
        await srv.close(0)
        await pp_srv.close(0)
        await b.stop()
        for s in (hole, *fillers):
            s.close()


async def test_a_changed_certificate_is_served_at_once_to_a_name_seen_before(pki) -> None:
    """the routing answer kept per server name holds the certificate: replacing it (a renewal)
    or removing it takes effect on the next connection."""
    b = await Backend("ok", "echo").start()
    srv, port = await start_proxy(pki, table=table_with(app("i1", "a1")))
    sni = f"a1-{b.port}.{DOMAIN}"
    reasons: list[str] = []
    srv.on_refused = reasons.append
    try:
        assert (await tls_exchange(port, sni, pki, b"one"))[0] == b"one"
        renewed = make_pki()  # another key under another CA
        srv.certs.set(DOMAIN, renewed.chain_pem, renewed.key_pem)
        with pytest.raises(ssl.SSLCertVerificationError):
            await tls_exchange(port, sni, pki, b"two")
        assert (await tls_exchange(port, sni, renewed, b"two"))[0] == b"two"
        srv.certs.remove(DOMAIN)
        # now a custom domain: its DNS lookup fails (no such record here) and it is refused
        srv.resolver.resolve = _no_record  # type: ignore[method-assign]
        with pytest.raises((ConnectionError, ssl.SSLError)):
            await tls_exchange(port, sni, renewed, b"three")
        assert reasons[-1] == "no record"
    finally:
        await srv.close(0)
        await b.stop()


async def _no_record(name: str) -> object:
    from pydstack.gateway.app_address import AppAddressError

    raise AppAddressError("no record")


async def test_the_name_cache_is_bounded(pki) -> None:
    from pydstack.gateway.proxy import _SNI_CACHE

    srv, _port = await start_proxy(pki, table=table_with(app("i1", "a1")))
    try:
        for i in range(_SNI_CACHE + 10):
            routed = srv._route_sni(f"x{i}-80.{DOMAIN}")
            assert routed is not None and routed[1].dest.id == f"x{i}"
            assert len(srv._sni_cache) <= _SNI_CACHE
        assert srv._route_sni("elsewhere.example.org") is None
    finally:
        await srv.close(0)


async def test_a_finished_connection_is_freed_without_the_cyclic_collector(pki) -> None:
    """a connection's setup object holds its TLS session until relayed; it must not wait for the
    cyclic collector to go (thousands of TLS sessions per second would pile up meanwhile)."""
    import gc

    from pydstack.gateway.proxy import _Conn

    b = await Backend("ok", "echo").start()
    srv, port = await start_proxy(pki, table=table_with(app("i1", "a1")))
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            assert (await tls_exchange(port, f"a1-{b.port}.{DOMAIN}", pki, b"hi"))[0] == b"hi"
        # a refused one too
        with pytest.raises((ConnectionError, ssl.SSLError)):
            await tls_exchange(port, f"nobody-{b.port}.{DOMAIN}", pki, b"x")
        await asyncio.sleep(0.1)
        assert not srv._conns
        assert [o for o in gc.get_objects() if isinstance(o, _Conn)] == []
    finally:
        gc.enable()
        await srv.close(0)
        await b.stop()
