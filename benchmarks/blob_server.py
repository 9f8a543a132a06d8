"""a no-work reference for bench_agent: the agent's own HTTP stack (the lean server on uvloop,
eager, the agent's response headers) answering every POST with one fixed body, on a unix socket
and a TCP port. `python blob_server.py BODY_FILE SOCKET PORT`; prints "ready" when listening."""

from __future__ import annotations

import sys
from pathlib import Path

from pydstack.guest.servers import RESPONSE_HEADERS
from pydstack.process import run_server, stop_signal
from pydstack.rpc.http1 import Http1Server, HttpRequest
from pydstack.rpc.server import Answer


async def serve(body: bytes, sock: str, port: int) -> None:
    server = Http1Server(response_headers=RESPONSE_HEADERS, eager=True)

    async def blob(_: HttpRequest) -> Answer:
        return Answer(200, body, "application/json")

    server.route("POST", "/Blob", blob)
    await server.listen_unix(sock)
    await server.listen_tcp("127.0.0.1", port)
    print("ready", flush=True)
    await stop_signal().wait()
    await server.close()


if __name__ == "__main__":
    run_server(serve(Path(sys.argv[1]).read_bytes(), sys.argv[2], int(sys.argv[3])))
