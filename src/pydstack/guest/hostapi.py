"""the guest's client of its VMM's host API (upstream's `host_api`): boot progress, errors and
instance info reach the host through `Notify`. Failures are logged, never fatal: a CVM boots
whether or not anyone is listening."""

from __future__ import annotations

import logging
from pathlib import Path

from google.protobuf.empty_pb2 import Empty

from pydstack.rpc.client import PrpcClient
from pydstack.rpc.proto import host_api_pb2 as hpb

log = logging.getLogger(__name__)


class HostApi:
    """the VMM's host API over the channel the VMM serves for this CVM (a Unix socket path, or
    an `http://host:port` base); failures are logged."""

    def __init__(self, socket_path: Path | str) -> None:
        self.client = PrpcClient(str(socket_path), prefix="/api", timeout=30)

    async def notify(self, event: str, payload: str) -> None:
        print(f"[{event}] {payload}", flush=True)
        try:
            await self.client.call("Notify", hpb.Notification(event=event, payload=payload), Empty)
        except Exception as e:
            log.warning("cannot notify the host (%s): %s", event, e)
