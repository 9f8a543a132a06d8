"""UpdateVm/UpgradeApp and ResizeVm: every requested change is checked, against the backend's
capabilities too, before anything is written, so a refused update leaves the VM as it was.
Nothing restarts the VM; changes apply at its next start (upstream's semantics).

UpdateVm, in upstream's terms: a non-empty `compose_file`, `encrypted_env` or `user_config`
replaces its file (the app id stays); `vcpu`/`memory`/`disk_size`/`image` follow ResizeVm's
rules (the VM must be stopped or exited); `gpus` and `no_tee` when present replace the VM's;
`ports`, `kms_urls`, `gateway_urls` and `networks` only with their `update_*` flag.
"""

from __future__ import annotations

import copy
import hashlib
from typing import TYPE_CHECKING

from google.protobuf.message import Message

from pydstack.rpc.proto import vmm_rpc_pb2 as pb

from . import hostshare
from .errors import InvalidState, Refused, Unsupported
from .validate import validate_app_compose
from .vm import Vm
from .workdir import VmManifest

if TYPE_CHECKING:
    from .app import VmmApp

RESIZE_FIELDS = ("vcpu", "memory", "disk_size", "image")


def _resized(app: VmmApp, vm: Vm, m: VmManifest, req: Message) -> bool:
    """apply the resize fields present in `req` to `m` (a copy); False when none is."""
    fields = [f for f in RESIZE_FIELDS if req.HasField(f)]
    if not fields:
        return False
    if app.status_of(vm) not in ("stopped", "exited"):
        raise InvalidState("the vm must be stopped to be resized")
    adm = app.admission
    values = {f: getattr(req, f) for f in fields}
    if "vcpu" in values:
        adm.vcpu(values["vcpu"])
        m.vcpu = values["vcpu"]
    if "memory" in values:
        adm.memory(values["memory"])
        m.memory = values["memory"]
    if "disk_size" in values and values["disk_size"] != m.disk_size:
        if not app.backend.capabilities.disk_resize:
            raise Unsupported("disk_size", f"the {app.backend.name} backend cannot resize disks")
        if values["disk_size"] < m.disk_size:
            raise Refused("the disk can only grow")
        m.disk_size = values["disk_size"]
    if "image" in values:
        if values["image"] not in app.images():
            raise Refused(f"image {values['image']!r} not found")
        m.image = values["image"]
    return True


def resize_vm(app: VmmApp, req: pb.ResizeVmRequest) -> None:
    vm = app.get(req.id)
    m = copy.deepcopy(vm.manifest)
    if not _resized(app, vm, m, req):
        raise Refused("nothing to resize: give vcpu, memory, disk_size or image")
    vm.workdir.save_manifest(m)
    vm.manifest = m


def update_vm(app: VmmApp, req: pb.UpdateVmRequest) -> str:
    vm = app.get(req.id)
    adm = app.admission
    m = copy.deepcopy(vm.manifest)
    result = ""
    if req.compose_file:
        validate_app_compose(req.compose_file)
        result = hashlib.sha256(req.compose_file.encode()).hexdigest()[:40]
    if len(req.encrypted_env) > hostshare.MAX_ENV:
        raise Refused("encrypted env too large")
    if len(req.user_config) > hostshare.MAX_USER_CONFIG:
        raise Refused("user config too large")
    if req.update_ports:
        ports = adm.port_mappings(req.ports)
        adm.ports(ports, vm=vm)
        m.port_map = ports
    if req.HasField("gpus"):
        m.gpus = adm.gpus(req.gpus)
    if req.HasField("no_tee"):
        m.no_tee, m.simulated_tee = adm.tee(req.no_tee, m.simulated_tee if req.no_tee else None)
    if req.update_networking:
        m.networks = adm.networks(req.networks, "networks")
    if req.update_kms_urls:
        m.kms_urls = list(req.kms_urls)
    if req.update_gateway_urls:
        m.gateway_urls = list(req.gateway_urls)
    _resized(app, vm, m, req)
    hostshare.write_updates(vm.workdir, req.compose_file, req.encrypted_env, req.user_config)
    vm.workdir.save_manifest(m)
    vm.manifest = m
    return result
