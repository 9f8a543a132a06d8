"""what a CVM's guest runs once the boot flow has its keys, the same in a sandbox and in a QEMU
guest: the agent's core with its certificate signer (the KMS's, or the app's own CA), the
identity line on the console, the agent's two sockets and the gateway client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydstack.rpc.http1 import Http1Server
from pydstack.types import hostshare as hs
from pydstack.types.sysconfig import SysConfig

from . import gateway_client
from .boot import BootResult, Notify
from .core import GuestCore, QuotePlatform
from .servers import Listener, ListenerOptions, start_agent
from .signer import KmsCertSigner, LocalCertSigner

if TYPE_CHECKING:
    from pydstack.rpc.server import PrpcServer


@dataclass
class GuestRuntime:
    """the running agent of a booted CVM; `servers` and `gateway` are the caller's to close."""

    core: GuestCore
    compose_raw: bytes
    sys_config: SysConfig
    servers: list[PrpcServer | Http1Server]
    gateway: gateway_client.GatewayClient | None


async def start_runtime(
    tdx: QuotePlatform,
    result: BootResult,
    work: Path,
    run: Path,
    notify: Notify,
    *,
    socket_group: int | None,
) -> GuestRuntime:
    """serve the agent for the app the boot flow measured (its files under `work`'s host-shared
    copy), with its sockets in `run` (0660, group `socket_group`: the app containers' root, so
    a container process running as another user reaches them with `group_add: ["0"]`).
    A gateway's first registration is left running: the caller awaits `gateway.ready()`
    before it reports the boot done."""
    compose_raw = (work / ".host-shared" / hs.APP_COMPOSE).read_bytes()
    sys_config = SysConfig.load(work / ".host-shared" / hs.SYS_CONFIG)
    signer: LocalCertSigner | KmsCertSigner
    if result.keys.key_provider.kind == "Kms":
        signer = KmsCertSigner(result.keys, sys_config.vm_config, lambda spki: b"")
    else:
        signer = LocalCertSigner(result.keys)
    core = GuestCore(tdx, result.keys, compose_raw, sys_config, signer)
    if isinstance(signer, KmsCertSigner):
        signer.attest = core.spki_attestation
    info = core.info(external=False)
    print(
        json.dumps(
            {
                "app_id": info.app_id.hex(),
                "instance_id": info.instance_id.hex(),
                "compose_hash": info.compose_hash.hex(),
                "device_id": info.device_id.hex(),
            }
        ),
        flush=True,
    )
    sockets = ListenerOptions(socket_mode=0o660, socket_group=socket_group)
    agent = await start_agent(
        core,
        [
            Listener(f"unix:{run / 'dstack.sock'}", ("dstack",), sockets, "dstack"),
            Listener(f"unix:{run / 'tappd.sock'}", ("tappd",), sockets, "tappd"),
        ],
    )
    try:
        # the first registration runs on while the boot sets up and pulls the app
        gateway = await gateway_client.start(core, result.keys, sys_config, notify, wait=False)
    except BaseException:
        await agent.close()
        raise
    return GuestRuntime(core, compose_raw, sys_config, list(agent.servers), gateway)
