"""the cvm side of the gateway without I/O: when to register, what it sends, which gateway it
trusts, and the wireguard config it writes."""

from __future__ import annotations

import asyncio
import socket

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from pydstack.crypto.wgkeys import generate_private_key, public_key_of
from pydstack.errors import InputError
from pydstack.guest.gateway_client import (
    HANDSHAKE_STALE,
    MAX_GATEWAYS,
    REFRESH_INTERVAL,
    GatewayClientError,
    KeepAlive,
    filter_sources,
    gateway_check,
    gateway_enabled,
    parse_registration,
    port_policy_message,
    render_cvm_config,
    rpc_base,
    strip_address,
)
from pydstack.rpc.proto import gateway_rpc_pb2 as gpb
from pydstack.rpc.server import RpcError
from tests.gateway_pki import KmsPki

GW_KEY = public_key_of(generate_private_key())


def test_enabled_by_the_compose_flags() -> None:
    assert gateway_enabled({"gateway_enabled": True})
    assert gateway_enabled({"tproxy_enabled": True})
    assert not gateway_enabled({"gateway_enabled": "yes"}) and not gateway_enabled({})


def test_the_port_policy_sent_is_the_composes() -> None:
    p = port_policy_message(
        {"port_policy": {"restrict_mode": True, "ports": [{"port": 443, "pp": True}, {"port": 80}]}}
    )
    assert p.restrict_mode and [(a.port, a.pp) for a in p.ports] == [(443, True), (80, False)]
    assert port_policy_message({}) == gpb.PortPolicy(restrict_mode=False)
    for bad in (
        {"port_policy": []},
        {"port_policy": {"ports": [{"port": 0}]}},
        {"port_policy": {"ports": [{"port": 70000}]}},
        {"port_policy": {"ports": [{"port": 80, "pp": "yes"}]}},
        {"port_policy": {"restrict_mode": "true"}},
    ):
        with pytest.raises(InputError):
            port_policy_message(bad)


def test_only_the_allowed_gateway_app_is_trusted() -> None:
    pki = KmsPki()
    gw, other = b"\x11" * 20, b"\x22" * 20
    cert = x509.load_pem_x509_certificates(pki.server_cert(gw, "10.0.0.1")[0].encode())[0]
    gateway_check(gw.hex())(cert)
    gateway_check(f"{other.hex()},{gw.hex().upper()}")(cert)
    with pytest.raises(RpcError, match="is not the allowed one"):
        gateway_check(other.hex())(cert)
    with pytest.raises(RpcError, match="is not the allowed one"):
        gateway_check("")(cert)


def response(*servers: gpb.WireGuardPeer, client_ip: str = "10.0.0.2") -> gpb.RegisterCvmResponse:
    return gpb.RegisterCvmResponse(wg=gpb.WireGuardConfig(client_ip=client_ip, servers=servers))


def test_peers_and_the_config_written() -> None:
    k2 = public_key_of(generate_private_key())
    resp = response(
        gpb.WireGuardPeer(pk=GW_KEY, ip="10.0.0.1/24", endpoint="10.213.0.1:51820"),
        gpb.WireGuardPeer(pk=k2, ip="10.1.0.1/16", endpoint="[2001:0db8::0001]:51820"),
    )
    reg = parse_registration(resp)
    assert [p.public_key for p in reg.peers] == sorted([GW_KEY, k2])
    assert reg.client_ip == "10.0.0.2" and reg.agent_port == 8090
    assert {p.endpoint: p.host for p in reg.peers} == {
        "10.213.0.1:51820": "10.213.0.1",
        "[2001:db8::1]:51820": "2001:db8::1",  # written back canonical
    }
    text = render_cvm_config("PRIV", reg.client_ip, reg.peers)
    assert "ListenPort = 9182\nAddress = 10.0.0.2/32\n" in text
    assert f"PublicKey = {GW_KEY}\nAllowedIPs = 10.0.0.1/32\nEndpoint = 10.213.0.1:51820\n" in text
    assert text.count("PersistentKeepalive = 25") == 2
    assert "Address" not in strip_address(text) and "PrivateKey = PRIV" in strip_address(text)
    resp.agent.internal_port = 65535
    assert parse_registration(resp).agent_port == 65535


def peer(
    pk: str = GW_KEY, ip: str = "10.0.0.1/24", endpoint: str = "1.2.3.4:1"
) -> gpb.WireGuardPeer:
    return gpb.WireGuardPeer(pk=pk, ip=ip, endpoint=endpoint)


#: a line a hostile answer would add to the CVM's WireGuard config
INJECTED = f"\n[Peer]\nPublicKey = {GW_KEY}\nAllowedIPs = 0.0.0.0/0\n"


@pytest.mark.parametrize(
    "resp",
    [
        response(),
        response(peer(pk="short")),
        response(peer(pk=GW_KEY + "\n")),
        response(peer(pk=GW_KEY[:-1] + "\n")),
        response(peer(ip="nonsense")),
        response(peer(ip="10.0.0.1/24" + INJECTED)),
        response(peer(endpoint="na me:1")),
        response(peer(endpoint="a..b:1")),
        response(peer(endpoint="-gw.example:1")),
        response(peer(endpoint="gw.example.:1")),
        response(peer(endpoint="\u0261w.example:1")),  # not ASCII
        response(peer(endpoint="1.2.3:1")),  # digits and dots: an address for some resolvers
        response(peer(endpoint="a" * 64 + ".example:1")),
        response(peer(endpoint="gw.example\nListenPort = 1:1")),
        response(peer(endpoint="1.2.3.4:x")),
        response(peer(endpoint="1.2.3.4:0")),
        response(peer(endpoint="1.2.3.4:65536")),
        response(peer(endpoint="1.2.3.4:\u0661\u0662")),  # Arabic-Indic digits are isdigit()
        response(peer(endpoint="1.2.3.4:1" + INJECTED)),
        # an IPv6 scope takes any text but '/' and ':'
        response(peer(endpoint="[fe80::1%x\nListenPort = 1\n[Peer]\nPublicKey = AAAA]:51820")),
        response(peer(endpoint="[fe80::1%eth0]:51820")),
        response(peer(endpoint="[[1.2.3.4]]:51820")),
        response(peer(endpoint="2001:db8::1:51820")),  # IPv6 without brackets
        response(peer(endpoint="1.2.3.4")),
        response(peer(), client_ip="x"),
        response(peer(), client_ip="10.0.0.2" + INJECTED),
        response(peer(), peer(ip="10.0.0.3/24")),  # one key twice
        response(
            *(peer(pk=public_key_of(generate_private_key())) for _ in range(MAX_GATEWAYS + 1))
        ),
    ],
)
def test_a_malformed_answer_is_refused(resp: gpb.RegisterCvmResponse) -> None:
    with pytest.raises(GatewayClientError):
        parse_registration(resp)


def test_an_agent_port_out_of_range_is_refused() -> None:
    resp = response(peer())
    resp.agent.internal_port = 65536
    with pytest.raises(GatewayClientError, match="agent port"):
        parse_registration(resp)


def test_rpc_base() -> None:
    assert rpc_base("https://gw:9012/prpc/") == "https://gw:9012"
    assert rpc_base("https://gw:9012") == "https://gw:9012"


def test_keep_alive_decisions() -> None:
    now = [1000.0]
    k = KeepAlive(clock=lambda: now[0])
    assert k.decide(False, float("inf")) == "force"  # nothing yet
    k.failed()
    assert k.decide(False, float("inf")) is None  # backing off 30 s
    now[0] += 30
    assert k.decide(False, float("inf")) == "force"
    k.failed()
    now[0] += 59
    assert k.decide(False, float("inf")) is None  # 60 s now
    now[0] += 1
    k.succeeded()
    assert k.decide(True, 5) is None
    assert k.decide(True, float("inf")) is None  # a fresh registration gets time to shake hands
    now[0] += HANDSHAKE_STALE
    assert k.decide(True, HANDSHAKE_STALE + 1) == "force"
    assert k.decide(True, 5) == "register"  # REFRESH_INTERVAL == HANDSHAKE_STALE
    assert REFRESH_INTERVAL == 180
    k.succeeded()
    assert k.decide(False, 5) == "force"  # the config went missing
    for _ in range(5):
        k.failed()
    assert k.backoff == 120  # capped


class FakeWg:
    def __init__(self) -> None:
        self.applied: list[tuple[str, str]] = []

    def present(self) -> bool:
        return bool(self.applied)

    async def apply(self, config: str, client_ip: str, peers) -> None:
        self.applied.append((config, client_ip))

    async def newest_handshake(self) -> float | None:
        return None


class FakeCore:
    def __init__(self) -> None:
        self.app_compose = {
            "gateway_enabled": True,
            "port_policy": {"restrict_mode": True, "ports": [{"port": 8080}]},
        }


class FakeRpc:
    def __init__(self, url: str, answers: dict, seen: list) -> None:
        self.url, self.answers, self.seen = url, answers, seen

    async def __aenter__(self) -> FakeRpc:
        return self

    async def __aexit__(self, *_: object) -> None:
        pass

    async def call(self, method: str, req, resp_type):
        self.seen.append((self.url, method, req))
        answer = self.answers[self.url]
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_registration_fails_over_in_order_and_starts_again_from_the_first() -> None:
    import socket

    from pydstack.guest import gateway_client as gc
    from pydstack.guest.appkeys import AppKeys, KeyProvider
    from pydstack.types.sysconfig import SysConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        agent_port = s.getsockname()[1]
    ok = response(gpb.WireGuardPeer(pk=GW_KEY, ip="10.0.0.1/24", endpoint="10.213.0.1:51820"),
                  client_ip="127.0.0.1")  # fmt: skip
    ok.agent.internal_port = agent_port
    answers: dict = {"https://a": RpcError("down"), "https://b": ok}
    seen: list = []
    keys = AppKeys(b"", b"", b"", b"", "11" * 20, "", KeyProvider("Kms", {}))

    class Client(gc.GatewayClient):
        async def _credentials(self):
            return gc._Credentials("priv", public_key_of(generate_private_key()), ["c"], "k", 1e12)

        def _client(self, url, creds):
            return FakeRpc(url, answers, seen)

    wg = FakeWg()
    client = Client(
        FakeCore(),  # type: ignore[arg-type]
        keys,
        SysConfig(gateway_urls=("https://a", "https://b")),
        wg=wg,  # type: ignore[arg-type]
    )
    try:
        assert await client.register(force=True) == "https://b"
        assert [u for u, _, _ in seen] == ["https://a", "https://b"]
        req = seen[-1][2]
        assert req.port_policy.restrict_mode and [p.port for p in req.port_policy.ports] == [8080]
        assert wg.applied[-1][1] == "127.0.0.1" and "Address = 127.0.0.1/32" in wg.applied[-1][0]
        answers["https://a"] = ok  # the first is back: the next registration goes there
        assert await client.register(force=False) == "https://a"
        assert len(wg.applied) == 1  # same config, not re-applied
        answers["https://a"] = answers["https://b"] = RpcError("gone")
        with pytest.raises(GatewayClientError, match="https://a: gone; https://b: gone"):
            await client.register(force=False)
    finally:
        await client.close()


async def test_the_first_registration_runs_while_the_boot_goes_on() -> None:
    import asyncio

    from pydstack.guest import gateway_client as gc
    from pydstack.guest.appkeys import AppKeys, KeyProvider
    from pydstack.types.sysconfig import SysConfig

    keys = AppKeys(b"", b"", b"", b"", "11" * 20, "", KeyProvider("Kms", {}))
    answer = asyncio.Event()
    outcomes = ["down", "ok"]
    calls: list[str] = []

    class Client(gc.GatewayClient):
        async def register(self, *, force: bool) -> str:
            await answer.wait()
            if not outcomes:  # the keep-alive loop's next registration: never answered here
                await asyncio.Event().wait()
            calls.append(outcomes.pop(0))
            if calls[-1] == "down":
                raise GatewayClientError("no gateway accepted the registration")
            return "https://a"

    for expect in ("down", "ok"):
        answer.clear()
        client = Client(
            FakeCore(),  # type: ignore[arg-type]
            keys,
            SysConfig(gateway_urls=("https://a",)),
            wg=FakeWg(),  # type: ignore[arg-type]
        )
        try:
            client.begin()
            waiter = asyncio.ensure_future(client.ready())
            await asyncio.sleep(0.05)
            assert not waiter.done() and client._task is None  # the boot goes on meanwhile
            answer.set()
            await asyncio.wait_for(waiter, 5)  # a failure counts as ready: the loop retries
            assert calls[-1] == expect and client._task is not None
            # the keep-alive loop knows how it went: a success, or a retry after its backoff
            assert (client.keepalive.last_ok is not None) == (expect == "ok")
            assert (client.keepalive.next_retry > 0) == (expect == "down")
        finally:
            await client.close()
        assert client._task.cancelled()


_FIELD = st.text(st.characters(codec="utf-8"), max_size=80) | st.sampled_from(
    ["10.0.0.1/24", "1.2.3.4:51820", "[2001:db8::1]:51820", GW_KEY, "10.0.0.2"]
)


@settings(max_examples=300, deadline=None)
@given(pk=_FIELD, ip=_FIELD, endpoint=_FIELD, client_ip=_FIELD)
def test_no_answer_adds_a_line_to_the_config(
    pk: str, ip: str, endpoint: str, client_ip: str
) -> None:
    """whatever the four fields hold, the answer is refused or the config has the fixed shape."""
    resp = response(gpb.WireGuardPeer(pk=pk, ip=ip, endpoint=endpoint), client_ip=client_ip)
    try:
        reg = parse_registration(resp)
    except GatewayClientError:
        return
    lines = render_cvm_config("PRIV", reg.client_ip, reg.peers).split("\n")
    keys = [line.split(" = ")[0] for line in lines if line]
    assert keys == ["[Interface]", "PrivateKey", "ListenPort", "Address", "[Peer]", "PublicKey",
                    "AllowedIPs", "Endpoint", "PersistentKeepalive"]  # fmt: skip
    assert all(line.isascii() and line.isprintable() for line in lines)


def test_a_dns_name_endpoint_is_kept_lower_cased() -> None:
    reg = parse_registration(response(peer(endpoint="GW-1.Example.COM:51820")))
    assert reg.peers[0].endpoint == "gw-1.example.com:51820"
    assert reg.peers[0].host == "gw-1.example.com"


async def test_the_filter_admits_addresses_and_what_names_resolve_to() -> None:
    v4, v6 = await filter_sources(["10.0.2.2", "2001:db8::1", "localhost", "10.0.2.2"])
    assert v4[0] == "10.0.2.2" and "127.0.0.1" in v4 and len(v4) == len(set(v4))
    assert v6[0] == "2001:db8::1"


async def test_a_name_that_does_not_resolve_fails_the_registration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def fail(*_: object, **__: object) -> None:
        raise socket.gaierror(-2, "Name or service not known")

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "getaddrinfo", fail)
    with pytest.raises(GatewayClientError, match=r"cannot resolve gateway endpoint gw\.example"):
        await filter_sources(["gw.example"])
