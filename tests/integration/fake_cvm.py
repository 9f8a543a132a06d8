"""a stand-in CVM for gateway tests, run inside a network namespace the test made
(``ip netns exec NS python -m tests.integration.fake_cvm ...``):

* ``wg CONFIG IFACE CLIENT_IP PEERS_JSON``: bring the CVM's tunnel up with the guest's own code
  (:class:`pydstack.guest.gateway_client.CvmWireGuard`), peers as ``[[key, ip, endpoint]]``;
* ``serve PORT NAME``: an HTTP server answering every GET with NAME (the app behind the tunnel).
"""

from __future__ import annotations

import asyncio
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pydstack.guest.gateway_client import CvmWireGuard, Peer, render_cvm_config


def wg_up(config: str, iface: str, client_ip: str, peers_json: str) -> None:
    private = sys.stdin.readline().strip()
    peers = [Peer(k, ip, ep) for k, ip, ep in json.loads(peers_json)]
    dev = CvmWireGuard(Path(config), interface=iface)
    asyncio.run(dev.apply(render_cvm_config(private, client_ip, peers), client_ip, peers))
    print("up", flush=True)


def serve(port: int, name: str) -> None:
    body = name.encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    print("serving", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1] == "wg":
        wg_up(*sys.argv[2:6])
    elif sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]}")
