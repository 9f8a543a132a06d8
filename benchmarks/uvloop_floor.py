"""the least a Python TLS-terminating proxy can do: bench_gateway's same-run floor.

One process of ``asyncio.Server`` on uvloop with TLS, one backend address, no SNI, routing,
limits, timeouts or PROXY headers: accept, handshake (uvloop's own TLS), connect, copy bytes
both ways with flow control, close. It is what the issue's "50-line asyncio+uvloop proxy"
stands for; bench_gateway starts ``--workers`` of them on one SO_REUSEPORT port, so the gateway's
figures read against what uvloop itself allows on the same machine in the same run.

    python benchmarks/uvloop_floor.py <chain.pem> <key.pem> <port> <backend-port>
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from typing import cast

import uvloop


class _Side(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _Client(_Side):
    backend_port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        backend = _Side()
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: backend, "127.0.0.1", self.backend_port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        assert backend.transport is not None
        backend.peer, self.peer = self, backend
        for data in self.early:
            backend.transport.write(data)
        self.early.clear()


async def _serve(chain: str, key: str, port: int, backend_port: int) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain, key)
    _Client.backend_port = backend_port
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        _Client, "127.0.0.1", port, ssl=ctx, reuse_port=True, backlog=4096
    )
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    if len(sys.argv) != 5:
        raise SystemExit("usage: uvloop_floor.py <chain.pem> <key.pem> <port> <backend-port>")
    chain, key, port, backend = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    uvloop.run(_serve(chain, key, port, backend))


if __name__ == "__main__":
    main()
