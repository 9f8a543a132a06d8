"""VmmApp on a FakeBackend: the VM lifecycle, reload, removal under the task owner, and the
auto-restart supervisor's backoff, all without root or real CVMs."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable

import pytest
from google.protobuf.empty_pb2 import Empty

from pydstack.errors import NotFoundError
from pydstack.rpc.client import PrpcClient
from pydstack.rpc.proto import host_api_pb2 as hpb
from pydstack.rpc.proto import vmm_rpc_pb2 as pb
from pydstack.types import hostshare as hs
from pydstack.vmm.errors import GuestUnavailable, InvalidState, Refused, VmNotFound

from .fakes import IMAGE, FakeBackend, FakeClock

COMPOSE = json.dumps(
    {
        "name": "a",
        "runner": "docker-compose",
        "docker_compose_file": "services:\n  w:\n    image: i\n",
    }
)


async def until(cond: Callable[[], bool]) -> None:
    """wait for background work to reach `cond` (a hang is a failure, not a timing check)."""
    async with asyncio.timeout(10):
        while not cond():
            await asyncio.sleep(0.01)


def config(**kw) -> pb.VmConfiguration:
    base = {"name": "web", "image": IMAGE, "compose_file": COMPOSE, "vcpu": 2, "memory": 512}
    return pb.VmConfiguration(**{**base, **kw})


async def test_create_starts_the_cvm_with_its_spec_host_share_and_host_api(make_app):
    backend = FakeBackend()
    app = await make_app(backend)
    vm_id = await app.create_vm(config(name="My Web"))
    vm = app.get(vm_id)
    assert backend.launched(vm_id) == 1 and backend.prepared
    _, spec = backend.launches[0]
    assert (spec.vcpu, spec.memory_mb, spec.hostname, spec.image.name) == (2, 512, "my-web", IMAGE)
    sys_config = json.loads(vm.workdir.read_shared(hs.SYS_CONFIG) or b"")
    assert sys_config["host_api_url"] == "unix:/fake/host-api"
    assert json.loads(sys_config["vm_config"])["os_image_hash"] == "ab" * 32
    assert vm.td is not None and vm.manifest.simulated_tee == "dstack-tdx"
    assert (vm.workdir.path / "serial.log").read_text().startswith("===== boot @ ")
    info = app.vm_info(vm)
    assert info.status == "running" and info.image_version == "1.2"
    assert info.interfaces[0].netdev_id == "fake0"
    sock = backend.host_api_channel(vm).socket
    async with PrpcClient(str(sock), prefix="/api") as client:
        host = await client.call("Info", Empty(), hpb.HostInfo)
        await client.call("Notify", hpb.Notification(event="boot.progress", payload="done"), Empty)
    assert host.name == "dstack VMM"
    assert app.vm_info(vm).boot_progress == "done"


async def test_stop_start_and_exited_at(make_app):
    backend, clock = FakeBackend(), FakeClock()
    app = await make_app(backend, clock)
    vm_id = await app.create_vm(config(stopped=True))
    vm = app.get(vm_id)
    assert backend.launched(vm_id) == 0
    assert app.vm_info(vm).status == "stopped" and app.vm_info(vm).exited_at == "never"
    await app.start_vm(vm_id)
    clock.now += 60
    await app.stop_vm(vm_id)
    assert backend.stops[-1] == (vm_id, 3.0) and vm_id in backend.cleanups
    clock.now += 5
    info = app.vm_info(vm)
    assert (info.status, info.exited_at, info.uptime) == ("stopped", "5s", "never")
    await app.start_vm(vm_id)
    assert backend.launched(vm_id) == 2 and app.vm_info(vm).status == "running"
    # a crash is an exit too: noticed, timed, and kept across a VMM restart
    backend.crash(vm_id)
    clock.now += 10
    assert app.vm_info(vm).status == "exited"
    clock.now += 2
    assert app.vm_info(vm).exited_at == "2s"
    await app.close()
    again = await make_app(FakeBackend(), clock)
    assert again.vm_info(again.get(vm_id)).exited_at == "2s"


async def test_shutdown_without_a_guest_api_presses_the_power_button(make_app):
    backend = FakeBackend()
    app = await make_app(backend)
    vm_id = await app.create_vm(config())
    with pytest.raises(GuestUnavailable):
        await app.guest_call(vm_id, "Info", Empty(), Empty)
    await app.shutdown_vm(vm_id)
    assert backend.power_offs == [vm_id] and not app.get(vm_id).workdir.started()
    backend.crash(vm_id)
    with pytest.raises(InvalidState, match="not running"):
        await app.shutdown_vm(vm_id)


async def test_unknown_vm_is_a_not_found_error(make_app):
    app = await make_app()
    for call in (app.start_vm, app.stop_vm, app.remove_vm, app.shutdown_vm):
        with pytest.raises(VmNotFound, match="vm not found: nope") as err:
            await call("nope")
        assert isinstance(err.value, NotFoundError)


async def test_remove_stops_cleans_and_forgets(make_app):
    backend = FakeBackend()
    app = await make_app(backend)
    vm_id = await app.create_vm(config())
    path = app.get(vm_id).workdir.path
    await app.remove_vm(vm_id)
    assert app.vm_info(app.get(vm_id)).status == "removing"
    await app.remove_vm(vm_id)  # idempotent while in progress
    await until(lambda: len(app.tasks) == 0)
    assert backend.stops == [(vm_id, 0.0)] and backend.cleanups == [vm_id]
    assert vm_id not in backend.attached and vm_id not in backend.running
    assert vm_id not in app.vms and not path.exists()


async def test_close_during_a_removal_leaves_nothing_pending_and_the_next_start_finishes_it(
    make_app,
):
    gate = asyncio.Event()
    backend = FakeBackend(stop_gate=gate)
    app = await make_app(backend)
    vm_id = await app.create_vm(config())
    path = app.get(vm_id).workdir.path
    await app.remove_vm(vm_id)
    await backend.stop_entered.wait()  # the removal is in flight, held inside backend.stop
    assert len(app.tasks) == 1
    async with asyncio.timeout(10):  # a close that never returns is a failure, not a hang
        await app.close()
    assert len(app.tasks) == 0
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    assert path.exists() and (path / ".removing").exists()
    with pytest.raises(RuntimeError, match="closed"):
        app.tasks.spawn(asyncio.sleep(0), name="late")
    # the next VMM finds the interrupted removal, stops the cvm first, then deletes it
    again_backend = FakeBackend()
    again_backend.running.add(vm_id)  # the cvm still runs
    again = await make_app(again_backend)
    await until(lambda: not path.exists())
    assert again_backend.stops == [(vm_id, 0.0)] and vm_id not in again.vms
    assert again_backend.launched(vm_id) == 0


async def test_reload_loads_drops_and_starts(make_app, tmp_path):
    backend = FakeBackend()
    app = await make_app(backend)
    keep = await app.create_vm(config(name="keep"))
    gone = await app.create_vm(config(name="gone"))
    backend.crash(keep)
    shutil.rmtree(app.get(gone).workdir.path)
    loaded, updated, removed = await app.reload()
    assert (loaded, updated, removed) == (0, 1, 1)
    assert gone not in app.vms and gone not in backend.attached and (gone, 0.0) in backend.stops
    assert backend.launched(keep) == 2  # marked started, not running: started again
    # a fresh VMM on the same run path finds the vm and, as it runs, does not relaunch it
    await app.close()
    fresh = FakeBackend()
    fresh.running.add(keep)
    again = await make_app(fresh)
    assert list(again.vms) == [keep] and fresh.launched(keep) == 0
    assert again.vm_info(again.get(keep)).status == "running"


async def test_auto_restart_backs_off_exponentially_and_gives_up(make_app):
    backend, clock = FakeBackend(), FakeClock()
    app = await make_app(backend, clock)  # initial backoff 5 s, max 3 retries
    vm_id = await app.create_vm(config())
    vm = app.get(vm_id)
    sup = app.supervisor
    delays = []
    for attempt in range(1, 4):
        backend.crash(vm_id)
        await sup.tick()  # notices the exit, schedules the restart
        delay = vm.next_restart - clock.now
        delays.append(delay)
        clock.now += delay - 0.5
        await sup.tick()
        assert backend.launched(vm_id) == attempt  # not yet
        clock.now += 0.5
        await sup.tick()
        assert backend.launched(vm_id) == attempt + 1
    assert delays == [5.0, 10.0, 20.0]
    events = [e.event for e in vm.runtime.events]
    assert events.count("vmm.auto_restart") == 3 and events[-1] == "vmm.auto_restart.exhausted"
    backend.crash(vm_id)
    for _ in range(3):
        clock.now += 1000
        await sup.tick()
    assert backend.launched(vm_id) == 4  # exhausted: no more
    # a stopped vm is never restarted, and its count starts over
    await app.stop_vm(vm_id)
    clock.now += 1000
    await sup.tick()
    assert backend.launched(vm_id) == 4 and vm.restart_attempts == 0


async def test_auto_restart_count_resets_after_healthy_running(make_app):
    backend, clock = FakeBackend(), FakeClock()
    app = await make_app(backend, clock, auto_restart_reset_window=300.0)
    vm_id = await app.create_vm(config())
    vm = app.get(vm_id)
    backend.crash(vm_id)
    await app.supervisor.tick()
    clock.now += 5
    await app.supervisor.tick()
    assert vm.restart_attempts == 1
    clock.now += 301
    await app.supervisor.tick()
    assert vm.restart_attempts == 0


async def test_a_refused_start_leaves_the_vm_stopped(make_app):
    backend = FakeBackend(refuse_start="not enough free host memory")
    app = await make_app(backend)
    vm_id = await app.create_vm(config(stopped=True))
    with pytest.raises(Refused, match="not enough free host memory"):
        await app.start_vm(vm_id)
    assert not app.get(vm_id).workdir.started() and backend.launched(vm_id) == 0
    # a create that cannot start is undone
    with pytest.raises(Exception, match="cannot start the vm: not enough free host memory"):
        await app.create_vm(config(name="other"))
    assert [vm.manifest.name for vm in app.vms.values()] == ["web"]
