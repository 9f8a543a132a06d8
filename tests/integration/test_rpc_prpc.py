"""prpc conformance against real servers on loopback and unix sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import textwrap

import aiohttp
import pytest
from google.protobuf.empty_pb2 import Empty

from pydstack.crypto.certs import CertRequest, cert_pem, generate_p256_key, issue_cert, key_pem
from pydstack.guest.service import GUEST_GET_METHODS, TAPPD_GET_METHODS
from pydstack.rpc.client import PrpcClient
from pydstack.rpc.http1 import Http1Server
from pydstack.rpc.proto import agent_rpc_pb2 as pb
from pydstack.rpc.proto import prpc_pb2
from pydstack.rpc.server import CallContext, PrpcServer, PrpcService, RpcError

GUEST = pb.DESCRIPTOR.services_by_name["DstackGuest"]
TAPPD = pb.DESCRIPTOR.services_by_name["Tappd"]


class Impl:
    def __init__(self) -> None:
        self.contexts: list[CallContext] = []

    async def GetQuote(self, req: pb.RawQuoteArgs, ctx: CallContext) -> pb.GetQuoteResponse:
        self.contexts.append(ctx)
        if len(req.report_data) > 64:
            raise RpcError("Report data is too long")
        return pb.GetQuoteResponse(quote=b"\xab\xcd", event_log="[]", report_data=req.report_data)

    async def GetTlsKey(self, req: pb.GetTlsKeyArgs, ctx: CallContext) -> pb.GetTlsKeyResponse:
        nb = req.not_before if req.HasField("not_before") else -1
        return pb.GetTlsKeyResponse(
            key=f"{req.subject}|{nb}", certificate_chain=list(req.alt_names)
        )

    async def Version(self, req: Empty, ctx: CallContext) -> pb.WorkerVersion:
        self.contexts.append(ctx)
        return pb.WorkerVersion(version="0.6.0", rev="test")

    async def Info(self, req: Empty, ctx: CallContext) -> pb.AppInfo:
        raise RuntimeError("boom")

    async def TdxQuote(self, req: pb.TdxQuoteArgs, ctx: CallContext) -> pb.TdxQuoteResponse:
        return pb.TdxQuoteResponse(quote=req.report_data, hash_algorithm=req.hash_algorithm)


@pytest.fixture(params=["aiohttp", "http1"])
async def server(tmp_path, request):
    impl = Impl()
    kind = PrpcServer if request.param == "aiohttp" else Http1Server
    srv = kind(max_body=4096, response_headers={"X-App-Version": "test"})
    srv.mount(
        PrpcService(
            GUEST,
            impl,
            omit_empty={"GetQuote": frozenset({"attestation"})},
            get_methods=GUEST_GET_METHODS,
        )
    )
    srv.mount(
        PrpcService(TAPPD, impl, prefix="/prpc/", trim="Tappd.", get_methods=TAPPD_GET_METHODS)
    )
    sock = tmp_path / "agent.sock"
    await srv.listen_unix(sock, mode=0o660)
    port = await srv.listen_tcp("127.0.0.1", 0)
    yield srv, impl, sock, f"http://127.0.0.1:{port}"
    await srv.close()


async def test_json_modes_and_shapes(server):
    _, _, _, url = server
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/GetQuote?report_data=00ff") as r:
            assert r.status == 200 and r.content_type == "application/json"
            assert r.headers["X-App-Version"] == "test"
            body = await r.read()
            assert "Content-Length" in r.headers
            assert body == b'{"quote":"abcd","event_log":"[]","report_data":"00ff","vm_config":""}'
        async with s.post(
            f"{url}/GetQuote?json", data=b'{"report_data":"0xABCD","unknown":1}'
        ) as r:
            assert (await r.json())["report_data"] == "abcd"
        headers = {"Content-Type": "application/json"}
        async with s.post(f"{url}/GetQuote", data=b"", headers=headers) as r:
            assert (await r.json())["report_data"] == ""
        async with s.post(
            f"{url}/GetTlsKey", data=b'{"subject":"s","alt_names":["a","b"]}', headers=headers
        ) as r:
            assert await r.json() == {"key": "s|-1", "certificate_chain": ["a", "b"]}
        async with s.post(f"{url}/GetTlsKey", data=b'{"not_before":5}', headers=headers) as r:
            assert (await r.json())["key"] == "|5"
        async with s.post(f"{url}/Version?json=1", data=b"null") as r:
            assert await r.json() == {"version": "0.6.0", "rev": "test"}


async def test_errors_in_both_modes(server):
    _, _, _, url = server
    # a str body is sent as text/plain, which is refused now: these carry a JSON content type
    json_ct = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{url}/GetQuote?json", data=json.dumps({"report_data": "00" * 65}), headers=json_ct
        ) as r:
            assert r.status == 400
            assert await r.text() == '{\n  "error": "Report data is too long"\n}'
        async with s.post(f"{url}/Nope?json", data=b"{}") as r:
            assert r.status == 400 and (await r.json())["error"] == "Service not found: Nope"
        async with s.post(f"{url}/DstackGuest.GetQuote?json", data=b"{}") as r:
            assert (await r.json())["error"] == "Service not found: DstackGuest.GetQuote"
        async with s.post(f"{url}/GetQuote?json", data=b'{"report_data":"zz"}') as r:
            assert r.status == 400 and "invalid hex" in (await r.json())["error"]
        async with s.post(f"{url}/GetQuote?json", data=b"[not json") as r:
            assert r.status == 400
        async with s.post(f"{url}/Info?json", data=b"") as r:
            # a handler bug is a 500 that names no internals; the server goes on serving
            assert r.status == 500 and (await r.json())["error"] == "internal error"
        big = json.dumps({"report_data": "00" * 5000})
        async with s.post(f"{url}/GetQuote?json", data=big, headers=json_ct) as r:
            assert r.status == 400 and "too large" in (await r.json())["error"]
        msg = pb.RawQuoteArgs(report_data=b"x" * 65).SerializeToString()
        async with s.post(f"{url}/GetQuote", data=msg) as r:
            assert r.status == 400
            assert (
                prpc_pb2.ProtoError.FromString(await r.read()).message == "Report data is too long"
            )
        async with s.post(f"{url}/GetQuote", data=b"\xff\xff\xff") as r:
            assert r.status == 400 and r.content_type == "application/octet-stream"
        # the server keeps serving after all of that
        async with s.get(f"{url}/Version") as r:
            assert r.status == 200


async def test_protobuf_mode_and_trim(server):
    _, _, sock, url = server
    client = PrpcClient(url, json_mode=False)
    try:
        resp = await client.call(
            "GetQuote", pb.RawQuoteArgs(report_data=b"\x01"), pb.GetQuoteResponse
        )
        assert resp.quote == b"\xab\xcd" and resp.report_data == b"\x01"
    finally:
        await client.close()
    for method in ("Tappd.TdxQuote", "TdxQuote"):
        tappd = PrpcClient(str(sock), prefix="/prpc/")
        try:
            r = await tappd.call(
                method,
                pb.TdxQuoteArgs(report_data=b"hi", hash_algorithm="raw"),
                pb.TdxQuoteResponse,
            )
            assert r.quote == b"hi" and r.hash_algorithm == "raw"
        finally:
            await tappd.close()


async def test_unix_socket_mode_and_peer_credentials(server):
    import os

    _, impl, sock, _ = server
    assert sock.stat().st_mode & 0o777 == 0o660
    client = PrpcClient(str(sock))
    try:
        await client.call("Version", Empty(), pb.WorkerVersion)
        with pytest.raises(RpcError, match="Report data is too long"):
            await client.call(
                "GetQuote", pb.RawQuoteArgs(report_data=b"x" * 65), pb.GetQuoteResponse
            )
    finally:
        await client.close()
    cred = impl.contexts[0].peer_cred
    assert cred is not None and cred.pid == os.getpid() and cred.uid == os.getuid()


def _raw_half_close(path: str) -> tuple[bytes, bool]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    body = b'{"report_data":"01"}'
    s.sendall(
        b"POST /GetQuote HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
    head, rest = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(rest) < length:
        rest += s.recv(4096)
    s.shutdown(socket.SHUT_WR)
    eof = s.recv(100) == b""
    s.close()
    return rest, eof


async def test_js_style_half_close(server):
    _, _, sock, _ = server
    body, eof = await asyncio.get_running_loop().run_in_executor(None, _raw_half_close, str(sock))
    assert json.loads(body)["report_data"] == "01"
    assert eof, "server must close once the client half-closes"


async def test_node_unix_client(server, tmp_path):
    _, _, sock, _ = server
    script = tmp_path / "client.js"
    script.write_text(
        textwrap.dedent("""
        const net = require('net');
        const body = JSON.stringify({report_data: 'ff'});
        const c = net.createConnection(process.argv[2], () => {
          const head = ['POST /GetQuote HTTP/1.1', 'Host: localhost',
            'Content-Type: application/json', `Content-Length: ${body.length}`];
          c.write(head.join('\\r\\n') + '\\r\\n\\r\\n' + body);
        });
        let data = '';
        c.on('data', (chunk) => {
          data += chunk;
          const [head, rest] = data.split('\\r\\n\\r\\n');
          const m = /content-length: (\\d+)/i.exec(head);
          if (m && rest !== undefined && rest.length >= parseInt(m[1])) c.end();
        });
        c.on('end', () => { console.log(data.split('\\r\\n\\r\\n')[1]); process.exit(0); });
        setTimeout(() => { console.error('timeout'); process.exit(1); }, 5000);
    """)
    )
    proc = await asyncio.create_subprocess_exec(
        "node", str(script), str(sock), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert json.loads(out)["report_data"] == "ff"


@pytest.mark.parametrize("kind", [PrpcServer, Http1Server])
async def test_tls_with_client_certificates(tmp_path, kind):
    ca_key = generate_p256_key()
    ca = issue_cert(CertRequest("Test CA", ca_level=1), ca_key.public_key(), ca_key)
    srv_key = generate_p256_key()
    srv_cert = issue_cert(
        CertRequest("localhost", alt_names=("localhost", "127.0.0.1"), usage_server_auth=True),
        srv_key.public_key(),
        ca_key,
        ca,
    )
    cli_key = generate_p256_key()
    cli_cert = issue_cert(
        CertRequest("client-1", usage_client_auth=True), cli_key.public_key(), ca_key, ca
    )
    impl = Impl()
    for required in (False, True):
        srv = kind()
        srv.mount(PrpcService(GUEST, impl, prefix="/prpc/"))
        port = await srv.listen_tls(
            "127.0.0.1",
            0,
            cert_pem=cert_pem(srv_cert),
            key_pem=key_pem(srv_key),
            client_ca_pem=cert_pem(ca),
            require_client_cert=required,
        )
        url = f"https://127.0.0.1:{port}"
        try:
            seen = []
            with_cert = PrpcClient(
                url,
                prefix="/prpc",
                client_cert_pem=cert_pem(cli_cert),
                client_key_pem=key_pem(cli_key),
                verify_server=seen.append,
            )
            await with_cert.call("Version", Empty(), pb.WorkerVersion)
            await with_cert.close()
            assert seen[0].subject == srv_cert.subject
            peer = impl.contexts[-1].peer_cert
            assert peer is not None and peer.subject == cli_cert.subject
            anonymous = PrpcClient(url, prefix="/prpc", ca_pem=cert_pem(ca))
            if required:
                with pytest.raises(Exception):  # noqa: B017 - the handshake fails
                    await anonymous.call("Version", Empty(), pb.WorkerVersion)
            else:
                await anonymous.call("Version", Empty(), pb.WorkerVersion)
                assert impl.contexts[-1].peer_cert is None
            await anonymous.close()
        finally:
            await srv.close()


@pytest.mark.parametrize("kind", [PrpcServer, Http1Server])
async def test_servers_that_check_client_certificates_issue_no_session_tickets(kind):
    """where clients prove who they are, every connection shows its certificate again: no
    TLS 1.3 or 1.2 tickets to resume with. A server without client certificates sends them
    (the control: the client sees tickets when there are any)."""
    import ssl
    import tempfile
    from pathlib import Path

    ca_key = generate_p256_key()
    ca = issue_cert(CertRequest("Test CA", ca_level=1), ca_key.public_key(), ca_key)
    srv_key = generate_p256_key()
    srv_cert = issue_cert(
        CertRequest("localhost", usage_server_auth=True), srv_key.public_key(), ca_key, ca
    )
    cli_key = generate_p256_key()
    cli_cert = issue_cert(CertRequest("client-1"), cli_key.public_key(), ca_key, ca)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "c.pem").write_text(cert_pem(cli_cert))
    (tmp / "k.pem").write_text(key_pem(cli_key))

    def has_ticket(port: int, version: ssl.TLSVersion) -> bool:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = version
        ctx.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
        raw = socket.create_connection(("127.0.0.1", port), 5)
        with ctx.wrap_socket(raw) as s:
            s.sendall(b"GET /prpc/Version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while s.recv(65536):  # tickets come after the handshake, with the answer
                pass
            return bool(s.session is not None and s.session.has_ticket)

    for client_ca, want in ((cert_pem(ca), False), (None, True)):
        srv = kind()
        srv.mount(PrpcService(GUEST, Impl(), prefix="/prpc/"))
        port = await srv.listen_tls(
            "127.0.0.1", 0, cert_pem=cert_pem(srv_cert), key_pem=key_pem(srv_key),
            client_ca_pem=client_ca,
        )  # fmt: skip
        try:
            for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
                assert await asyncio.to_thread(has_ticket, port, version) is want, version
        finally:
            await srv.close()
