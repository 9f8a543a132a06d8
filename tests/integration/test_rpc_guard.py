"""CSRF and DNS-rebinding protection of the prpc server, against a VMM-like server on loopback.

Each refused request is shown not to reach its handler (the handlers count their calls); the
clients that must keep working (vmm-cli, the SDKs, upstream's Rust client, the web UI) are
replayed byte for byte with raw HTTP.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from google.protobuf.empty_pb2 import Empty

from pydstack.crypto.certs import CertRequest, cert_pem, generate_p256_key, issue_cert, key_pem
from pydstack.rpc.guard import RequestGuard, normalize_origin, split_host
from pydstack.rpc.http1 import Http1Server, HttpRequest
from pydstack.rpc.proto import prpc_pb2
from pydstack.rpc.proto import vmm_rpc_pb2 as pb
from pydstack.rpc.server import Answer, CallContext, PrpcServer, PrpcService
from pydstack.vmm.service import VMM_GET_METHODS

VMM = pb.DESCRIPTOR.services_by_name["Vmm"]


class CountingVmm:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def CreateVm(self, req: pb.VmConfiguration, ctx: CallContext) -> pb.Id:
        self.calls["CreateVm"] += 1
        return pb.Id(id="vm-" + req.name)

    async def RemoveVm(self, req: pb.Id, ctx: CallContext) -> Empty:
        self.calls["RemoveVm"] += 1
        return Empty()

    async def Status(self, req: pb.StatusRequest, ctx: CallContext) -> pb.StatusResponse:
        self.calls["Status"] += 1
        return pb.StatusResponse(total=7)


class Stack:
    def __init__(
        self,
        server: PrpcServer | Http1Server,
        impl: CountingVmm,
        plain: Counter[str],
        port: int,
        sock: Path,
    ) -> None:
        self.server, self.impl, self.plain, self.port, self.sock = server, impl, plain, port, sock

    @property
    def calls(self) -> int:
        """calls that reached a handler, prpc or plain"""
        return sum(self.impl.calls.values()) + sum(self.plain.values())


@pytest.fixture(params=["aiohttp", "http1"])
async def vmm(tmp_path, request):
    impl = CountingVmm()
    guard = RequestGuard(
        allowed_hosts=frozenset({"vmm.example", "*.lab.example"}),
        allowed_origins=frozenset({"https://ui.example:8443"}),
    )
    srv: PrpcServer | Http1Server
    plain = Counter[str]()
    if request.param == "aiohttp":
        srv = PrpcServer(guard=guard)

        async def logs(_: web.Request) -> web.Response:
            plain["logs"] += 1
            return web.Response(text="log line\n")

        srv.app.router.add_get("/logs", logs)
    else:
        srv = Http1Server(guard=guard)

        async def logs_http1(_: HttpRequest) -> Answer:
            plain["logs"] += 1
            return Answer(200, b"log line\n", "text/plain")

        srv.route("GET", "/logs", logs_http1)
    srv.mount(PrpcService(VMM, impl, prefix="/prpc", trim="Teepod.", get_methods=VMM_GET_METHODS))
    port = await srv.listen_tcp("127.0.0.1", 0)
    sock = tmp_path / "vmm.sock"
    await srv.listen_unix(sock)
    yield Stack(srv, impl, plain, port, sock)
    await srv.close()


async def raw(
    target: int | Path,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    host: str | None = None,
    encoding: str = "utf-8",
) -> tuple[int, dict[str, str], bytes]:
    """one HTTP/1.1 request with exactly these headers (Host defaults to 127.0.0.1:port), its
    head in `encoding`."""
    if isinstance(target, Path):
        reader, writer = await asyncio.open_unix_connection(str(target))
        host = host or "localhost"
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", target)
        host = host or f"127.0.0.1:{target}"
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode(encoding) + body)
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    hdrs = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), hdrs, rest


JSON_CT = {"Content-Type": "application/json"}
CREATE = json.dumps({"name": "x", "image": "i"}).encode()


def error_of(body: bytes) -> str:
    return str(json.loads(body)["error"])


async def test_simple_content_types_are_refused(vmm):
    for ctype in (
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
    ):
        for query in ("?json", ""):
            status, _, body = await raw(
                vmm.port, "POST", f"/prpc/CreateVm{query}", {"Content-Type": ctype}, CREATE
            )
            assert status == 415, (ctype, query)
            assert "is refused" in error_of(body) and "application/json" in error_of(body)
    status, _, body = await raw(
        vmm.port, "POST", "/prpc/CreateVm", {"Content-Type": "application/xml"}, CREATE
    )
    assert status == 415 and "unsupported content type" in error_of(body)
    assert vmm.calls == 0


async def test_get_runs_only_read_only_methods(vmm):
    for path in ("/prpc/CreateVm?name=x&image=i", "/prpc/RemoveVm?id=abc", "/prpc/Teepod.RemoveVm"):
        status, headers, body = await raw(vmm.port, "GET", path)
        assert status == 405, path
        assert headers["allow"] == "POST"
        assert "call it with POST, not GET" in error_of(body)
    assert vmm.calls == 0
    status, _, body = await raw(vmm.port, "GET", "/prpc/Status?brief=true")
    assert status == 200 and json.loads(body)["total"] == 7
    assert vmm.impl.calls == Counter({"Status": 1})


async def test_cross_origin_and_cross_site_are_refused(vmm):
    cases = [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": f"http://127.0.0.1:{vmm.port + 1}"},  # another port is another origin
        {"Origin": f"https://127.0.0.1:{vmm.port}"},  # and so is another scheme
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": f"http://127.0.0.1:{vmm.port}", "Sec-Fetch-Site": "cross-site"},
    ]
    for extra in cases:
        status, _, body = await raw(
            vmm.port, "POST", "/prpc/RemoveVm?json", {**JSON_CT, **extra}, b'{"id":"a"}'
        )
        assert status == 403, extra
        assert "refused" in error_of(body) and "allowed_origins" in error_of(body)
        # plain aiohttp routes pass the same guard
        status, _, body = await raw(vmm.port, "GET", "/logs?id=a", extra)
        assert status == 403, extra
    # protobuf-mode callers get the refusal as a ProtoError
    status, _, body = await raw(
        vmm.port,
        "POST",
        "/prpc/RemoveVm",
        {"Content-Type": "application/octet-stream", "Origin": "http://evil.example"},
        pb.Id(id="a").SerializeToString(),
    )
    assert status == 403 and "refused" in prpc_pb2.ProtoError.FromString(body).message
    assert vmm.calls == 0


async def test_dns_rebinding_host_is_refused_on_tcp(vmm):
    for host in ("evil.example", f"evil.example:{vmm.port}", "lab.example", "x.evil.example"):
        status, _, body = await raw(
            vmm.port, "POST", "/prpc/CreateVm?json", JSON_CT, CREATE, host=host
        )
        assert status == 403, host
        assert error_of(body).startswith("host not allowed") and "allowed_hosts" in error_of(body)
        status, _, _ = await raw(vmm.port, "GET", "/logs?id=a", host=host)
        assert status == 403
    assert vmm.calls == 0
    # names this machine answers to, IP literals and configured names pass
    for host in (
        f"localhost:{vmm.port}",
        f"LOCALHOST.:{vmm.port}",
        f"[::1]:{vmm.port}",
        "10.1.2.3",
        f"vmm.example:{vmm.port}",
        "a.b.lab.example",
    ):
        status, _, _ = await raw(vmm.port, "GET", "/prpc/Status", host=host)
        assert status == 200, host
    # a unix socket is out of a browser's reach: any Host is fine there
    status, _, _ = await raw(vmm.sock, "POST", "/prpc/CreateVm?json", JSON_CT, CREATE, "evil")
    assert status == 200


async def test_a_host_port_of_non_ascii_digits_is_refused_not_an_error(vmm):
    """`Host: localhost:\xb2` reads (as latin-1) as a superscript two, which str.isdigit()
    accepts and int() refuses; `\u0668\u0660` are Arabic-Indic digits int() reads as 80.
    Neither is a port: a 403 (the guard's refusal), never a 500 or a reset."""
    for host, encoding in (("localhost:\xb2", "latin-1"), ("localhost:\u0668\u0660", "utf-8")):
        for target in (vmm.port,):
            status, _, body = await raw(
                target, "POST", "/prpc/CreateVm?json", JSON_CT, CREATE, host, encoding
            )
            assert status in (400, 403), (host, status, body[:200])
    assert vmm.calls == 0


async def test_official_clients_and_the_web_ui_still_work(vmm):
    # vmm-cli.py: http.client, ?json, application/json, default Host, no Origin
    status, _, body = await raw(vmm.port, "POST", "/prpc/CreateVm?json", JSON_CT, CREATE)
    assert status == 200 and json.loads(body) == {"id": "vm-x"}
    # upstream's Rust prpc client: ?json and a JSON body, no Content-Type at all
    status, _, body = await raw(vmm.port, "POST", "/prpc/CreateVm?json", {}, CREATE)
    assert status == 200 and json.loads(body) == {"id": "vm-x"}
    # protobuf, with and without a content type (upstream's default mode is protobuf)
    msg = pb.VmConfiguration(name="p").SerializeToString()
    for headers in ({"Content-Type": "application/octet-stream"}, {}):
        status, _, body = await raw(vmm.port, "POST", "/prpc/CreateVm", headers, msg)
        assert status == 200 and pb.Id.FromString(body).id == "vm-p"
    # the web UI: a same-origin fetch from the page the VMM served
    browser = {"Origin": f"http://127.0.0.1:{vmm.port}", "Sec-Fetch-Site": "same-origin"}
    status, _, body = await raw(
        vmm.port, "POST", "/prpc/Status?json", {**JSON_CT, **browser}, b"{}"
    )
    assert status == 200 and json.loads(body)["total"] == 7
    proto_ui = {"Content-Type": "application/octet-stream", **browser}
    status, _, _ = await raw(vmm.port, "POST", "/prpc/RemoveVm", proto_ui, b"")
    assert status == 200
    status, _, body = await raw(vmm.port, "GET", "/logs?id=a", {"Sec-Fetch-Site": "same-origin"})
    assert status == 200 and body == b"log line\n"
    # a typed URL or bookmark
    status, _, _ = await raw(vmm.port, "GET", "/logs?id=a", {"Sec-Fetch-Site": "none"})
    assert status == 200
    # a configured origin may call cross-site
    allowed = {"Origin": "https://ui.example:8443", "Sec-Fetch-Site": "cross-site"}
    status, _, _ = await raw(vmm.port, "POST", "/prpc/RemoveVm?json", {**JSON_CT, **allowed}, b"{}")
    assert status == 200
    assert vmm.impl.calls == Counter({"CreateVm": 4, "Status": 1, "RemoveVm": 2})


def test_guard_config_is_validated():
    with pytest.raises(ValueError, match="invalid allowed origin"):
        RequestGuard(allowed_origins=frozenset({"evil.example"}))
    with pytest.raises(ValueError, match="invalid allowed host"):
        RequestGuard(allowed_hosts=frozenset({"bad host"}))
    with pytest.raises(ValueError, match=r"x\.allowed_hosts must be a list of strings"):
        RequestGuard.from_config("evil", None, hosts_key="x.allowed_hosts")
    assert RequestGuard(allowed_hosts=frozenset({"*"})).host_allowed("anything.example")
    assert normalize_origin("HTTP://Example.COM") == "http://example.com:80"
    assert normalize_origin("https://[::1]:8443") == "https://[::1]:8443"
    assert normalize_origin("http://a/b") is None
    assert split_host("[::1]:80") == ("::1", 80)
    assert split_host("a:b:c") is None and split_host("a:99999") is None
    # found by the http_guard fuzz target: hosts are DNS characters or a bracketed IPv6 address
    # (so a normalized origin is ASCII), with no zone and no newline before the port
    for bad in ("\u00e9", "a b:80", "a\n:80", "[x]:80", "[fe80::1%eth0]:80", "[10.0.0.1]"):
        assert split_host(bad) is None, bad
        assert normalize_origin(f"http://{bad}") is None, bad
    assert split_host("[fe80::1]:80") == ("fe80::1", 80) and split_host("a_b.c-d.") == (
        "a_b.c-d.",
        None,
    )


@pytest.mark.parametrize("kind", [PrpcServer, Http1Server])
async def test_tls_listener_answers_to_its_certificate_names(kind):
    key = generate_p256_key()
    cert = issue_cert(
        CertRequest("kms.example", alt_names=("kms.example", "10.0.0.1"), usage_server_auth=True),
        key.public_key(),
        key,
    )
    impl = CountingVmm()
    srv = kind()
    srv.mount(PrpcService(VMM, impl, prefix="/prpc", get_methods=VMM_GET_METHODS))
    port = await srv.listen_tls("127.0.0.1", 0, cert_pem=cert_pem(cert), key_pem=key_pem(key))
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    try:
        async with aiohttp.ClientSession() as s:
            for host, status in (("kms.example", 200), ("other.example", 403)):
                url = f"https://127.0.0.1:{port}/prpc/Status"
                async with s.get(url, headers={"Host": host}, ssl=ctx) as r:
                    assert r.status == status, host
        assert impl.calls == Counter({"Status": 1})
    finally:
        await srv.close()
