"""the sample app: a small HTTP service that asks its CVM's dstack.sock for keys and quotes.

Runs inside a container with nothing but the Python standard library (the image is built by
`pydstack.apps.image`). Routes (GET): `/` Info, `/key?path=&purpose=` GetKey,
`/quote?report_data=<hex>` GetQuote, `/env?name=` one environment variable, `/health`,
`/data?name=` a file from `DATA_DIR` (default /data, the persistent volume); POST `/data?name=`
writes the request body there.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sys
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


def main() -> None:
    port = int(os.environ.get("PORT", "8080"))
    # as a container's pid 1 nothing stops us on SIGTERM unless we handle it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"hello: listening on :{port}, dstack socket {SOCKET}", flush=True)
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
