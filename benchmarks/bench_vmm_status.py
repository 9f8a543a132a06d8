"""VMM `Status` with many VMs: the answer (built and JSON-encoded) for 300 VMs, brief and full,
next to its floor (encoding a prebuilt response of the same size). The VMs run on the test
suite's FakeBackend, so this measures the VMM and not the CVMs."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from pydstack.rpc.json_codec import message_to_json
from pydstack.rpc.proto import vmm_rpc_pb2 as pb
from pydstack.vmm.app import VmmApp
from pydstack.vmm.service import VmmService
from tests.unit.vmm.fakes import IMAGE, FakeBackend, FakeClock, vmm_config

COMPOSE = json.dumps(
    {
        "manifest_version": 2,
        "name": "bench",
        "runner": "docker-compose",
        "docker_compose_file": "services:\n  a:\n    image: x\n",
        "key_provider": "none",
    }
)


def best(fn, n: int = 15) -> float:
    out = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


async def main(count: int = 300) -> None:
    with tempfile.TemporaryDirectory() as d:
        app = VmmApp(
            vmm_config(Path(d), max_cvm_number=count + 1), FakeBackend(), clock=FakeClock()
        )
        await app.start()
        svc = VmmService(app)
        for i in range(count):
            await app.create_vm(
                pb.VmConfiguration(name=f"vm{i}", image=IMAGE, compose_file=COMPOSE)
            )
        print(f"# Status with {count} vms (best of 15), next to encoding a prebuilt answer")
        for brief in (True, False):
            req = pb.StatusRequest(brief=brief)
            built = await svc.Status(req, None)  # type: ignore[arg-type]
            floor = best(lambda: message_to_json(built))  # noqa: B023

            t = float("inf")
            for _ in range(15):
                t0 = time.perf_counter()
                message_to_json(await svc.Status(req, None))  # type: ignore[arg-type]
                t = min(t, time.perf_counter() - t0)
            label = "brief" if brief else "full"
            print(
                f"  {label:<6} {t * 1e3:7.1f} ms   floor {floor * 1e3:7.1f} ms   {t / floor:5.1f}x"
            )
        await app.close()


if __name__ == "__main__":
    asyncio.run(main())
