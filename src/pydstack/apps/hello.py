"""the sample app: a small HTTP service that asks its CVM's dstack.sock for keys and quotes.

Runs inside a container with nothing but the Python standard library (the image is built by
`pydstack.apps.image`). Routes (GET): `/` Info, `/key?path=&purpose=` GetKey,
`/quote?report_data=<hex>` GetQuote, `/env?name=` one environment variable, `/health`,
`/data?name=` a file from `DATA_DIR` (default /data, the persistent volume); POST `/data?name=`
writes the request body there.

Optional listeners (for the gateway's modes): `TLS_PORT` serves the same routes over HTTPS with a
certificate from the agent's GetTlsKey (what a passthrough route reaches), `H2C_PORT` answers
cleartext HTTP/2 with prior knowledge (what a `g` route reaches): every request gets 200 and
`{"proto": "h2", "stream": <id>}`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import struct
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

SOCKET = os.environ.get("DSTACK_SOCKET", "/var/run/dstack.sock")
DATA_DIR = os.environ.get("DATA_DIR", "/data")
MAX_BODY = 1024 * 1024


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.path)


def dstack(method: str, body: dict[str, object] | None = None) -> dict[str, object]:
    conn = _UnixConnection(SOCKET)
    try:
        data = json.dumps(body or {}).encode()
        conn.request("POST", f"/{method}", data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        out = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{method}: http {resp.status}: {out[:200]!r}")
        value = json.loads(out)
        if not isinstance(value, dict):
            raise RuntimeError(f"{method}: unexpected response")
        return value
    finally:
        conn.close()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        try:
            if url.path == "/health":
                return self._send(200, {"ok": True})
            if url.path == "/":
                return self._send(200, dstack("Info"))
            if url.path == "/key":
                req: dict[str, object] = {
                    "path": q.get("path", ""),
                    "purpose": q.get("purpose", ""),
                }
                return self._send(200, dstack("GetKey", req))
            if url.path == "/quote":
                return self._send(
                    200, dstack("GetQuote", {"report_data": q.get("report_data", "")})
                )
            if url.path == "/data":
                path = self._data_path(q.get("name", ""))
                if path is None or not os.path.isfile(path):
                    return self._send(404, {"error": "no such file"})
                with open(path) as f:
                    return self._send(200, {"name": q["name"], "value": f.read()})
            if url.path == "/env":
                name = q.get("name", "")
                if name in os.environ:
                    return self._send(200, {"name": name, "value": os.environ[name]})
                return self._send(404, {"error": f"{name} is not set"})
            return self._send(404, {"error": "not found"})
        except Exception as e:  # report, keep serving
            return self._send(502, {"error": str(e)})

    def do_POST(self) -> None:
        url = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        size = int(self.headers.get("Content-Length") or 0)
        if url.path != "/data":
            return self._send(404, {"error": "not found"})
        path = self._data_path(q.get("name", ""))
        if path is None or not 0 <= size <= MAX_BODY:
            return self._send(400, {"error": "bad name or body too large"})
        data = self.rfile.read(size)
        with open(path, "wb") as f:
            f.write(data)
        return self._send(200, {"name": q["name"], "size": len(data)})

    @staticmethod
    def _data_path(name: str) -> str | None:
        if not name or "/" in name or name.startswith("."):
            return None
        return os.path.join(DATA_DIR, name)

    def _send(self, status: int, value: object) -> None:
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: object) -> None:
        sys.stdout.write(f"{self.address_string()} {fmt % args}\n")
        sys.stdout.flush()


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_DATA, H2_HEADERS, H2_SETTINGS, H2_PING, H2_GOAWAY = 0, 1, 4, 6, 7
H2_END_STREAM, H2_ACK, H2_END_HEADERS = 0x1, 0x1, 0x4
H2_MAX_FRAME = 1 << 14


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream)


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def h2c_connection(conn: socket.socket) -> None:
    """one cleartext HTTP/2 connection: 200 and a small JSON body for every request."""
    with conn:
        if _read_exactly(conn, len(H2_PREFACE)) != H2_PREFACE:
            return
        conn.sendall(_h2_frame(H2_SETTINGS, 0, 0))
        while True:
            head = _read_exactly(conn, 9)
            length = int.from_bytes(head[:3], "big")
            kind, flags = head[3], head[4]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            if length > H2_MAX_FRAME:
                return
            payload = _read_exactly(conn, length)
            if kind == H2_SETTINGS and not flags & H2_ACK:
                conn.sendall(_h2_frame(H2_SETTINGS, H2_ACK, 0))
            elif kind == H2_PING and not flags & H2_ACK:
                conn.sendall(_h2_frame(H2_PING, H2_ACK, 0, payload) + payload)
            elif kind == H2_GOAWAY:
                return
            elif kind in (H2_HEADERS, H2_DATA) and flags & H2_END_STREAM and stream:
                body = json.dumps({"proto": "h2", "stream": stream}).encode()
                status = b"\x88"  # hpack: the static table's ":status: 200"
                conn.sendall(
                    _h2_frame(H2_HEADERS, H2_END_HEADERS, stream, status)
                    + status
                    + _h2_frame(H2_DATA, H2_END_STREAM, stream, body)
                    + body
                )


def serve_h2c(port: int) -> None:
    srv = socket.create_server(("0.0.0.0", port), reuse_port=False)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_h2c_safe, args=(conn,), daemon=True).start()


def _h2c_safe(conn: socket.socket) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        h2c_connection(conn)


def serve_tls(port: int) -> None:
    """the routes over HTTPS, with a certificate the agent issues for this app."""
    got = dstack(
        "GetTlsKey",
        {"subject": "hello", "usage_server_auth": True, "usage_ra_tls": False},
    )
    certs = got.get("certificate_chain")
    chain = "".join(str(c) for c in certs) if isinstance(certs, list) else ""
    with tempfile.TemporaryDirectory() as d:
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        with open(cert, "w") as f:
            f.write(chain)
        with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(str(got["key"]))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
    srv = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    srv.serve_forever()


def main() -> None:
    port = int(os.environ.get("PORT", "8080"))
    # as a container's pid 1 nothing stops us on SIGTERM unless we handle it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    for name, serve in (("TLS_PORT", serve_tls), ("H2C_PORT", serve_h2c)):
        extra = os.environ.get(name)
        if extra:
            threading.Thread(target=serve, args=(int(extra),), daemon=True).start()
            print(f"hello: {name.split('_')[0].lower()} on :{extra}", flush=True)
    print(f"hello: listening on :{port}, dstack socket {SOCKET}", flush=True)
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
