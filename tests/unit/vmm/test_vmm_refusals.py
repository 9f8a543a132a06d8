"""wire fidelity with upstream: every CreateVm/UpdateVm field is honoured or refused by name
(never dropped), as the backend's capabilities say; the service answers with upstream's shapes
(`info: null`, `configuration: null`) and strings."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest
from google.protobuf.empty_pb2 import Empty

from pydstack.rpc.json_codec import message_to_obj
from pydstack.rpc.proto import vmm_rpc_pb2 as pb
from pydstack.rpc.server import CallContext
from pydstack.vmm.backends import GpuDevice
from pydstack.vmm.errors import KMS_NOT_CONFIGURED, InvalidState, Refused, Unsupported
from pydstack.vmm.service import VmmService
from pydstack.vmm.workdir import GpuSelection, NetworkSpec

from .fakes import CAPS, FakeBackend
from .test_vmm_app import config

CTX = CallContext(None, None, None)
RICH = replace(
    CAPS,
    networking_modes=("bridge", "user"),
    bridges=("br0", "br1"),
    gpus=True,
    hugepages=True,
    pin_numa=True,
    tee_kinds=("tdx", "simulated-tdx"),
    no_tee=True,
)


def nothing_created(app, backend) -> bool:
    return not app.vms and not backend.attached and not list(app.config.run_path.iterdir())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"networking": pb.NetworkingConfig(mode="user")}, "networking: mode 'user' is not"),
        ({"networks": [pb.NetworkingConfig(mode="user")]}, "networks: mode 'user' is not"),
        (
            {"networks": [pb.NetworkingConfig(mode="bridge", bridge_name="virbr9")]},
            "networks: bridge 'virbr9' is not available",
        ),
        ({"networks": [pb.NetworkingConfig(), pb.NetworkingConfig()]}, "networks: .* at most 1"),
        ({"hugepages": True}, "hugepages: the fake backend cannot"),
        ({"pin_numa": True}, "pin_numa: the fake backend cannot"),
        ({"gpus": pb.GpuConfig(attach_mode="all")}, "gpus: the fake backend cannot attach"),
        ({"gpus": pb.GpuConfig(gpus=[pb.GpuSpec(slot="18:00.0")])}, "gpus: the fake backend"),
        ({"simulated_tee": "dstack-amd-sev-snp"}, "simulated_tee: 'dstack-amd-sev-snp' is not"),
    ],
)
async def test_create_refuses_what_the_backend_cannot_honour(make_app, fields, message):
    backend = FakeBackend()
    app = await make_app(backend)
    with pytest.raises(Unsupported, match=message):
        await app.create_vm(config(**fields))
    assert nothing_created(app, backend)


async def test_create_stores_what_the_backend_honours(make_app):
    backend = FakeBackend(RICH, gpus=[GpuDevice("18:00.0", "10de:2335", "H100", True)])
    app = await make_app(backend)
    vm_id = await app.create_vm(
        config(
            hugepages=True,
            pin_numa=True,
            gpus=pb.GpuConfig(attach_mode="listed", gpus=[pb.GpuSpec(slot="18:00.0")]),
            networks=[pb.NetworkingConfig(mode="bridge", bridge_name="br1")],
            networking=pb.NetworkingConfig(mode="user"),  # networks wins
            no_tee=False,
        )
    )
    m = app.get(vm_id).manifest
    assert (m.hugepages, m.pin_numa) == (True, True)
    assert m.gpus == GpuSelection("listed", ("18:00.0",))
    assert m.networks == [NetworkSpec("bridge", "br1")]
    assert (m.no_tee, m.simulated_tee) == (False, None) and app.get(vm_id).td is None
    _, spec = backend.launches[0]
    assert spec.hugepages and spec.gpus.slots == ("18:00.0",) and not spec.no_tee
    cfg = app.vm_info(app.get(vm_id)).configuration
    assert cfg.hugepages and cfg.pin_numa and [g.slot for g in cfg.gpus.gpus] == ["18:00.0"]
    assert [(n.mode, n.bridge_name) for n in cfg.networks] == [("bridge", "br1")]
    # the legacy single `networking` counts when `networks` is empty
    other = await app.create_vm(config(name="b", networking=pb.NetworkingConfig(mode="user")))
    assert app.get(other).manifest.networks == [NetworkSpec("user", "")]
    with pytest.raises(Refused, match=r"no gpu at slot '01:00\.0'"):
        await app.create_vm(config(name="c", gpus=pb.GpuConfig(gpus=[pb.GpuSpec(slot="01:00.0")])))


async def test_without_hardware_tee_the_simulated_td_stands_in(make_app):
    app = await make_app()
    for no_tee in (False, True):
        vm = app.get(await app.create_vm(config(name=f"t{no_tee}", no_tee=no_tee)))
        assert (vm.manifest.no_tee, vm.manifest.simulated_tee) == (True, "dstack-tdx")
        assert vm.td is not None


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"gpus": pb.GpuConfig(attach_mode="all")}, "gpus: the fake backend cannot attach"),
        ({"update_networking": True, "networks": [pb.NetworkingConfig(mode="user")]}, "networks:"),
        ({"update_ports": True, "ports": [pb.PortMapping(host_port=80, vm_port=80)]}, "outside"),
        ({"vcpu": 4}, "must be stopped"),
        ({"compose_file": "{"}, "invalid app compose"),
    ],
)
async def test_a_refused_update_changes_nothing(make_app, update, message):
    app = await make_app()
    vm = app.get(await app.create_vm(config()))
    before = vm.manifest.to_json()
    share = sorted((p.name, p.read_bytes()) for p in vm.workdir.shared.iterdir())
    with pytest.raises(Refused, match=message):
        fields = {"compose_file": COMPOSE2, "encrypted_env": b"\x01" * 64, **update}
        await app.update_vm(pb.UpdateVmRequest(id=vm.id, **fields))
    assert vm.manifest.to_json() == before == vm.workdir.manifest().to_json()
    assert sorted((p.name, p.read_bytes()) for p in vm.workdir.shared.iterdir()) == share


COMPOSE2 = json.dumps(
    {
        "name": "b",
        "runner": "docker-compose",
        "docker_compose_file": "services:\n  x:\n    image: j\n",
    }
)


async def test_update_honours_gpus_no_tee_and_networks(make_app):
    backend = FakeBackend(RICH, gpus=[GpuDevice("18:00.0", "10de:2335", "H100", True)])
    app = await make_app(backend)
    vm = app.get(await app.create_vm(config(no_tee=False)))
    result = await app.update_vm(
        pb.UpdateVmRequest(
            id=vm.id,
            compose_file=COMPOSE2,
            gpus=pb.GpuConfig(gpus=[pb.GpuSpec(slot="18:00.0")]),
            no_tee=True,
            update_networking=True,
            networks=[pb.NetworkingConfig(mode="user")],
            update_kms_urls=True,
            kms_urls=["https://kms.example"],
        )
    )
    assert result == hashlib.sha256(COMPOSE2.encode()).hexdigest()[:40]
    m = vm.workdir.manifest()
    assert m.gpus.slots == ("18:00.0",) and m.no_tee and m.networks == [NetworkSpec("user", "")]
    assert m.kms_urls == ["https://kms.example"] and m.app_id == vm.manifest.app_id
    # "no gpus" is honoured by any backend; an empty networks list is the default interface
    await app.update_vm(
        pb.UpdateVmRequest(
            id=vm.id, gpus=pb.GpuConfig(attach_mode="listed"), update_networking=True
        )
    )
    assert not vm.manifest.gpus.any and vm.manifest.networks == []


async def test_update_no_tee_refused_where_every_cvm_needs_a_tee(make_app):
    backend = FakeBackend(replace(RICH, no_tee=False))
    app = await make_app(backend)
    vm = app.get(await app.create_vm(config(no_tee=False)))
    with pytest.raises(Unsupported, match="no_tee: the fake backend runs every cvm under a tee"):
        await app.update_vm(pb.UpdateVmRequest(id=vm.id, no_tee=True))
    assert not vm.workdir.manifest().no_tee
    # absent no_tee (proto3 optional) is no change, not "false"
    await app.update_vm(pb.UpdateVmRequest(id=vm.id, update_kms_urls=True))
    assert not vm.manifest.no_tee


async def test_resize_rules(make_app):
    backend = FakeBackend(replace(CAPS, disk_resize=False))
    app = await make_app(backend, max_allocable_vcpu=8)
    vm = app.get(await app.create_vm(config(stopped=True)))
    with pytest.raises(Refused, match="nothing to resize"):
        await app.resize_vm(pb.ResizeVmRequest(id=vm.id))
    with pytest.raises(Refused, match="invalid vcpu count 9"):
        await app.resize_vm(pb.ResizeVmRequest(id=vm.id, vcpu=9))
    with pytest.raises(Unsupported, match="disk_size: the fake backend cannot resize"):
        await app.resize_vm(pb.ResizeVmRequest(id=vm.id, vcpu=4, disk_size=40))
    assert vm.workdir.manifest().vcpu == 2  # nothing of a refused resize is kept
    await app.resize_vm(pb.ResizeVmRequest(id=vm.id, vcpu=4, memory=2048))
    assert (vm.workdir.manifest().vcpu, vm.manifest.memory) == (4, 2048)
    await app.start_vm(vm.id)
    with pytest.raises(InvalidState, match="must be stopped"):
        await app.resize_vm(pb.ResizeVmRequest(id=vm.id, vcpu=2))


async def test_service_answers_in_upstreams_shapes(make_app):
    backend = FakeBackend(RICH, gpus=[GpuDevice("18:00.0", "10de:2335", "H100", True)])
    app = await make_app(backend, kms_url="")
    svc = VmmService(app)
    vm_id = (await svc.CreateVm(config(), CTX)).id
    assert message_to_obj(await svc.GetInfo(pb.Id(id="nope"), CTX)) == {
        "found": False,
        "info": None,
    }
    found = message_to_obj(await svc.GetInfo(pb.Id(id=vm_id), CTX))
    assert found["info"]["configuration"]["name"] == "web"
    brief = message_to_obj(await svc.Status(pb.StatusRequest(brief=True), CTX))
    assert brief["vms"][0]["id"] == vm_id and brief["vms"][0]["configuration"] is None
    full = message_to_obj(await svc.Status(pb.StatusRequest(), CTX))
    assert full["vms"][0]["configuration"]["vcpu"] == 2
    meta = await svc.GetMeta(Empty(), CTX)
    assert list(meta.networking.supported_modes) == ["bridge", "user"]
    assert (meta.networking.default_mode, meta.networking.default_bridge) == ("bridge", "br0")
    gpus = await svc.ListGpus(Empty(), CTX)
    assert [g.slot for g in gpus.gpus] == ["18:00.0"] and not gpus.allow_attach_all
    sv = await svc.SvList(Empty(), CTX)
    assert sv.processes[0].pid == 4242 and sv.processes[0].status == "running"
    with pytest.raises(Refused) as err:
        await svc.GetAppEnvEncryptPubKey(pb.AppId(app_id=b"\x01" * 20), CTX)
    assert str(err.value) == KMS_NOT_CONFIGURED == "KMS is not configured"


async def test_service_lists_no_gpus_without_the_capability(make_app):
    app = await make_app(FakeBackend(gpus=[GpuDevice("18:00.0", "10de:2335", "H100", True)]))
    gpus = await VmmService(app).ListGpus(Empty(), CTX)
    assert list(gpus.gpus) == [] and not gpus.allow_attach_all
