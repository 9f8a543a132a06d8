"""targets of `pydstack.gateway` and of the CVM's side of it: what the gateway reads from the
internet before it knows who is calling (a TLS ClientHello, a PROXY protocol header, an HTTP
request head, a custom domain's TXT record), and what a CVM reads back from a gateway."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from fuzz import mutators as m
from fuzz.harness import Target
from fuzz.targets import common as c
from pydstack.crypto.wgkeys import public_key_of
from pydstack.gateway.app_address import AppAddressError, parse_app_address
from pydstack.gateway.ingress import IngressError, classify
from pydstack.gateway.policy import (
    MAX_PORTS,
    PortPolicy,
    PortPolicyError,
    policy_from_agent_info,
)
from pydstack.gateway.proxy_protocol import (
    V1_MAX,
    ProxyProtocolError,
    encode_v2,
    parse_proxy_header,
)
from pydstack.gateway.sni import MAX_CLIENT_HELLO, ClientHelloError, parse_client_hello
from pydstack.gateway.special import MAX_HEAD, HttpHeadError, parse_request_head
from pydstack.guest.gateway_client import GatewayClientError, parse_registration, render_cvm_config
from pydstack.rpc.json_codec import CodecError, json_to_message
from pydstack.rpc.proto import gateway_rpc_pb2 as gpb
from tests.unit.gateway.hello import openssl_hello, records  # real OpenSSL ClientHellos

T = TypeVar("T")


def _cuts(n: int) -> tuple[int, ...]:
    """where a stream is cut to feed a parser a prefix (the bytes read so far)."""
    return tuple(sorted({1, n // 3, n // 2, n - 1} - {0})) if n > 1 else ()


def _whole_and_prefixes(
    parse: Callable[[bytes], T | None],
    error: type[Exception],
    data: bytes,
    cuts: Iterable[int],
) -> T | None:
    """`parse(data)` (None when it raises `error`), after checking that each prefix `data[:cut]`
    reads on (None) or parses the same, and is refused only when the whole is not parsed: the
    answer must not depend on how the network cut the stream."""
    try:
        whole = parse(data)
    except error:
        whole = None
    for cut in cuts:
        try:
            early = parse(data[:cut])
        except error:
            assert whole is None, f"a prefix of {cut} bytes is refused"
            continue
        assert early is None or early == whole, f"a prefix of {cut} bytes parses otherwise"
    return whole


# -- TLS ClientHello -------------------------------------------------------------------------


def _hello_seeds() -> list[tuple[str, bytes]]:
    plain = openssl_hello("app.dstack.example")
    msg = plain[5:]  # the same hello in two records, split inside the extensions
    split = records(msg, split=len(msg) // 2)
    return [
        ("terminate", plain),
        ("split-records", split),
        ("passthrough", openssl_hello("0123abcd-443s.dstack.example")),
        ("h2", openssl_hello("0123abcd-8080g.dstack.example", ["h2", "http/1.1"])),
        ("tls12", openssl_hello("gateway.dstack.example", tls12=True)),
        ("no-sni", openssl_hello(None)),
        ("custom-domain", openssl_hello("www.customer.example.", ["http/1.1"])),
    ]


def _client_hello(data: bytes) -> None:
    cuts = _cuts(min(len(data), MAX_CLIENT_HELLO))
    hello = _whole_and_prefixes(parse_client_hello, ClientHelloError, data, cuts)
    if hello is None:
        return
    assert 0 < len(hello.sni) <= 253 and hello.sni.isascii() and hello.sni == hello.sni.lower()
    assert all(0 < len(p) <= 255 for p in hello.alpn)
    with contextlib.suppress(IngressError):
        target = classify(hello.sni, localhost_backend=True)
        assert 1 <= target.dest.port <= 65535 and target.dest.id


CLIENT_HELLO = Target(
    name="client_hello",
    doc="`gateway/sni.py::parse_client_hello` (the first bytes of every connection) on the input "
    "and on prefixes of it (a prefix of a hello that parses reads on or parses the same), then "
    "the SNI through `gateway/ingress.py::classify`",
    make=lambda: _client_hello,
    allowed=(ClientHelloError,),
    seeds=_hello_seeds,
    mutators=m.BINARY,
    tokens=(b"\x16\x03\x01", b"\x16\x03\x03", b"\x00\x00", b"\x00\x10", b"\x02h2", b"-443s."),
    max_len=2 * MAX_CLIENT_HELLO,
    calls=5,
)

# -- PROXY protocol --------------------------------------------------------------------------


def _proxy_seeds() -> list[tuple[str, bytes]]:
    body = b"GET / HTTP/1.1\r\n\r\n"
    return [
        ("v1-tcp4", b"PROXY TCP4 192.0.2.1 198.51.100.2 51000 443\r\n" + body),
        ("v1-tcp6", b"PROXY TCP6 2001:db8::1 2001:db8::2 51000 443\r\n" + body),
        ("v1-unknown", b"PROXY UNKNOWN\r\n" + body),
        ("v2-tcp4", encode_v2(("192.0.2.1", 51000), ("198.51.100.2", 443)) + body),
        ("v2-tcp6", encode_v2(("2001:db8::1", 51000), ("2001:db8::2", 443)) + body),
        ("v2-unspec", encode_v2(None, None) + body),
    ]


def _proxy_header(data: bytes) -> None:
    cuts = (*range(1, min(len(data), V1_MAX + 1)), *_cuts(len(data)))  # every v1 prefix
    parsed = _whole_and_prefixes(parse_proxy_header, ProxyProtocolError, data, cuts)
    if parsed is None:
        return
    header, used = parsed
    assert 0 < used <= len(data) and header.raw == data[:used]
    again = parse_proxy_header(header.to_v2())  # what the gateway sends on must parse
    assert again is not None and again[1] == len(header.to_v2())
    if header.src is not None and again[0].src is not None:
        assert _ip(again[0].src[0]) == _ip(header.src[0]) and again[0].src[1] == header.src[1]


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


PROXY_HEADER = Target(
    name="proxy_header",
    doc="`gateway/proxy_protocol.py::parse_proxy_header` (v1 and v2) on the input and on "
    "prefixes of it; the header sent on (`to_v2`) parses back to the same client address",
    make=lambda: _proxy_header,
    allowed=(ProxyProtocolError,),
    seeds=_proxy_seeds,
    mutators=(*m.BINARY, m.splice),
    tokens=(b"PROXY ", b"TCP4 ", b"TCP6 ", b"UNKNOWN", b"\r\n", b"\r\n\r\n\x00\r\nQUIT\n", b"\x21"),
    max_len=4096,
    calls=V1_MAX + 5,
)

# -- the gateway's own HTTP heads and custom-domain records --------------------------------


def _head_seeds() -> list[tuple[str, bytes]]:
    return [
        ("index", b"GET /.dstack/index HTTP/1.1\r\nHost: gateway.example\r\n\r\n"),
        ("acme-info", b"GET /.dstack/acme-info?x=1 HTTP/1.0\r\n\r\n"),
        ("health", b"HEAD /health HTTP/1.1\r\nConnection: close\r\n\r\n"),
    ]


def _http_head(data: bytes) -> None:
    try:
        parsed = parse_request_head(data)
    except HttpHeadError:
        return
    if parsed is not None:
        method, path = parsed
        assert method.isascii() and method.isalpha() and path.startswith("/") and "?" not in path


HTTP_HEAD = Target(
    name="gateway_http_head",
    doc="`gateway/special.py::parse_request_head`: the request line of a connection to the "
    "gateway's own names (`gateway`, `health`)",
    make=lambda: _http_head,
    allowed=(HttpHeadError,),
    seeds=_head_seeds,
    mutators=(*m.TEXT, m.truncate),
    tokens=(b"GET ", b" HTTP/1.1\r\n", b"\r\n\r\n", b"/.dstack/"),
    max_len=2 * MAX_HEAD,
)


def _app_address(data: bytes) -> None:
    text = data.decode("ascii", "replace")  # as the resolver decodes a TXT string
    try:
        addr = parse_app_address(text)
    except AppAddressError:
        pass
    else:
        assert addr.id.isascii() and addr.id.isalnum() and 1 <= addr.port <= 65535
    # the same text as an SNI: a custom domain's name reaches the grammar first
    with contextlib.suppress(IngressError):
        classify(c.text(data).lower())


APP_ADDRESS = Target(
    name="app_address",
    doc="`gateway/app_address.py::parse_app_address` (a custom domain's `_dstack-app-address` "
    "TXT string) and `gateway/ingress.py::classify` of the input as an SNI",
    make=lambda: _app_address,
    allowed=(),
    seeds=lambda: [("record", b"0123456789abcdef:8443"), ("sni", b"0123abcd-8080s.dstack.example")],
    mutators=(*m.TEXT, m.truncate),
    tokens=(b":443", b"-", b"s.", b"g."),
    max_len=1024,
    calls=2,
)

# -- RegisterCvm's answer, as the CVM reads it -----------------------------------------------

_CONFIG_KEYS = [
    "[Interface]", "PrivateKey", "ListenPort", "Address",
    "[Peer]", "PublicKey", "AllowedIPs", "Endpoint", "PersistentKeepalive",
]  # fmt: skip


def _register_seeds() -> list[tuple[str, bytes]]:
    keys = [public_key_of(base64.b64encode(bytes([i]) * 32).decode()) for i in (1, 2)]
    doc = {
        "wg": {
            "client_ip": "10.4.0.2",
            "servers": [
                {"pk": keys[0], "ip": "10.4.0.1/24", "endpoint": "10.0.2.2:51820"},
                {"pk": keys[1], "ip": "10.4.0.3/24", "endpoint": "[2001:db8::2]:51820"},
            ],
        },
        "agent": {"external_port": 8090, "internal_port": 8090, "domain": "dstack.example"},
    }
    return [("two-gateways", json.dumps(doc).encode())]


def _register_answer(data: bytes) -> None:
    try:
        resp = gpb.RegisterCvmResponse()
        json_to_message(data, resp)
        reg = parse_registration(resp)
    except (CodecError, GatewayClientError):
        return
    lines = render_cvm_config("PRIVATE", reg.client_ip, reg.peers).split("\n")
    keys = [line.split(" = ")[0] for line in lines if line]
    assert keys == _CONFIG_KEYS[:4] + _CONFIG_KEYS[4:] * len(reg.peers), "config lines added"
    assert all(line.isascii() and line.isprintable() for line in lines)


REGISTER_ANSWER = Target(
    name="register_answer",
    doc="what a CVM reads from a gateway: a `RegisterCvmResponse` in prpc JSON, "
    "`guest/gateway_client.py::parse_registration`, and the WireGuard config written from it "
    "(no line added, whatever the answer)",
    make=lambda: _register_answer,
    allowed=(),
    seeds=_register_seeds,
    mutators=m.JSON,
    tokens=(b'"endpoint"', b'"pk"', b'"client_ip"', b"%", b"\\n", b"]:", b"/32"),
    max_len=16 * 1024,
)

# -- the port policy a CVM reports: its agent's Info, as the gateway's policy fetch reads it --


def _port_policy(data: bytes) -> None:
    text = c.text(data)
    for info in ({"tcb_info": text}, {"tcb_info": json.dumps({"app_compose": text})}):
        try:
            policy = policy_from_agent_info(info)
        except PortPolicyError as e:
            assert len(str(e)) < 300, "an error message grew with its input"
            continue
        assert len(policy.ports) <= MAX_PORTS
        assert all(1 <= p <= 65535 and isinstance(pp, bool) for p, pp in policy.ports.items())
        again = PortPolicy.from_json(policy.to_json())
        assert again == policy, "a policy does not survive its own json form"


def _policy_seeds() -> list[tuple[str, bytes]]:
    compose = {"manifest_version": 2, "name": "app", "runner": "docker-compose"}
    policy = {"restrict_mode": True, "ports": [{"port": 8080, "pp": True}, {"port": 443}]}
    return [
        ("policy", json.dumps({**compose, "port_policy": policy}).encode()),
        ("open", json.dumps(compose).encode()),
        ("tcb", json.dumps({"app_compose": json.dumps({"port_policy": policy})}).encode()),
    ]


PORT_POLICY = Target(
    name="port_policy",
    doc="`gateway/policy.py::policy_from_agent_info`: the port policy in a CVM agent's `Info` "
    "(tcb_info → app_compose → port_policy, JSON in JSON), the input as either level; a "
    "policy read survives its JSON form and errors stay short",
    make=lambda: _port_policy,
    allowed=(),
    seeds=_policy_seeds,
    mutators=m.JSON,
    tokens=(b'"port_policy"', b'"restrict_mode"', b'"ports"', b'"port"', b'"pp"', b"65536"),
    max_len=16 * 1024,
    calls=2,
)

TARGETS: Sequence[Target] = (
    CLIENT_HELLO,
    PROXY_HEADER,
    HTTP_HEAD,
    APP_ADDRESS,
    REGISTER_ANSWER,
    PORT_POLICY,
)
