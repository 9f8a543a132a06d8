"""a prpc server with a trivial Version method on a unix socket (the benchmarks' floor)."""

from __future__ import annotations

import asyncio
import sys

from google.protobuf.empty_pb2 import Empty

from pydstack.rpc.proto import agent_rpc_pb2 as pb
from pydstack.rpc.server import CallContext, PrpcServer, PrpcService


class Trivial:
    async def Version(self, req: Empty, ctx: CallContext) -> pb.WorkerVersion:
        return pb.WorkerVersion(version="0", rev="trivial")


async def main(path: str) -> None:
    srv = PrpcServer()
    srv.mount(PrpcService(pb.DESCRIPTOR.services_by_name["DstackGuest"], Trivial()))
    await srv.listen_unix(path)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
