"""the sandbox launcher's port mappings: host ports relayed into the CVM (TCP and UDP)."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass


@dataclass
class PortForward:
    protocol: str
    address: str
    host_port: int
    vm_port: int


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def forward_tcp(pf: PortForward, target: str) -> asyncio.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.wait_for(asyncio.open_connection(target, pf.vm_port), 10)
        except (OSError, TimeoutError):
            w.close()
            return
        await asyncio.gather(_pipe(r, uw), _pipe(ur, w))

    return await asyncio.start_server(handle, pf.address, pf.host_port, reuse_address=True)


class _UdpRelay(asyncio.DatagramProtocol):
    """host port → CVM port; one upstream socket per client address."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.transport: asyncio.DatagramTransport | None = None
        self.peers: dict[tuple[str, int], asyncio.DatagramTransport] = {}
        self.pending: set[asyncio.Future[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        up = self.peers.get(addr)
        if up is not None:
            up.sendto(data)
            return
        if len(self.peers) >= 1024:
            return
        task = asyncio.ensure_future(self._open(data, addr))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _open(self, data: bytes, addr: tuple[str, int]) -> None:
        relay = self

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, d: bytes, _: tuple[str, int]) -> None:
                if relay.transport is not None:
                    relay.transport.sendto(d, addr)

        loop = asyncio.get_running_loop()
        up, _ = await loop.create_datagram_endpoint(Back, remote_addr=self.target)
        self.peers[addr] = up
        up.sendto(data)


async def forward_udp(pf: PortForward, target: str) -> asyncio.DatagramTransport:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _UdpRelay((target, pf.vm_port)), local_addr=(pf.address, pf.host_port)
    )
    return transport
