"""`dstack lsvm | info | start | stop | remove | logs | lsimage | lsgpu`: looking at VMs and
driving their lifecycle."""

from __future__ import annotations

import argparse

from google.protobuf.empty_pb2 import Empty

from pydstack.rpc.proto import vmm_rpc_pb2 as pb

from .common import CliError, VmmClient
from .output import gpus, ms_time, print_json, status, table


def get_info(c: VmmClient, vm_id: str) -> pb.VmInfo:
    """the VM's full info; CliError when the VMM does not know it."""
    r = c.call("GetInfo", pb.Id(id=vm_id), pb.GetInfoResponse)
    if not r.found:
        raise CliError(f"vm {vm_id} not found")
    return r.info


def cmd_lsvm(c: VmmClient, a: argparse.Namespace) -> None:
    vms = c.call("Status", pb.StatusRequest(), pb.StatusResponse).vms
    if a.json:
        print_json(vms)
        return
    headers = ["VM ID", "App ID", "Name", "Status", "Uptime"]
    if a.verbose:
        headers += ["Instance ID", "vCPU", "Memory", "Disk", "Image", "GPUs"]
    rows = []
    for vm in vms:
        row = [vm.id, vm.app_id, vm.name, status(vm), vm.uptime or "-"]
        if a.verbose:
            cfg = vm.configuration
            row += [
                vm.instance_id or "-",
                str(cfg.vcpu),
                f"{cfg.memory}MB",
                f"{cfg.disk_size}GB",
                cfg.image,
                gpus(cfg),
            ]
        rows.append(row)
    print(table(headers, rows))
    for vm in vms:
        if vm.boot_error:
            print(f"{vm.id}: boot error: {vm.boot_error}")


def cmd_info(c: VmmClient, a: argparse.Namespace) -> None:
    info = get_info(c, a.vm_id)
    if a.json:
        print_json(info)
        return
    cfg = info.configuration
    fields = [
        ("VM ID", info.id),
        ("Name", info.name),
        ("Status", info.status),
        ("Uptime", info.uptime or "-"),
        ("App ID", info.app_id),
        ("Instance ID", info.instance_id or "-"),
        ("Image", cfg.image),
        ("vCPU", cfg.vcpu),
        ("Memory", f"{cfg.memory}MB"),
        ("Disk", f"{cfg.disk_size}GB"),
        ("Boot Progress", info.boot_progress or "-"),
        ("Boot Error", info.boot_error or "-"),
        ("Shutdown", info.shutdown_progress or "-"),
        ("Exited At", info.exited_at or "-"),
    ]
    if cfg.HasField("simulated_tee"):
        fields.append(("Simulated TEE", cfg.simulated_tee))
    for name, value in fields:
        print(f"{name + ':':<15} {value}")
    if cfg.ports:
        print("Ports:")
        for p in cfg.ports:
            print(f"  {p.protocol}:{p.host_address}:{p.host_port} -> {p.vm_port}")
    if info.events:
        print("Events:")
        for e in info.events[-10:]:
            print(f"  {ms_time(e.timestamp)} {e.event}: {e.body}")


def cmd_start(c: VmmClient, a: argparse.Namespace) -> None:
    c.call("StartVm", pb.Id(id=a.vm_id), Empty)
    print(f"started vm {a.vm_id}")


def cmd_stop(c: VmmClient, a: argparse.Namespace) -> None:
    c.call("StopVm" if a.force else "ShutdownVm", pb.Id(id=a.vm_id), Empty)
    print(f"{'stopped' if a.force else 'shutting down'} vm {a.vm_id}")


def cmd_remove(c: VmmClient, a: argparse.Namespace) -> None:
    c.call("RemoveVm", pb.Id(id=a.vm_id), Empty)
    print(f"removed vm {a.vm_id}")


def cmd_logs(c: VmmClient, a: argparse.Namespace) -> None:
    c.logs(a.vm_id, a.lines, a.follow)


def cmd_lsimage(c: VmmClient, a: argparse.Namespace) -> None:
    images = c.call("ListImages", Empty(), pb.ImageListResponse).images
    if a.json:
        print_json(images)
        return
    print(table(["Name", "Version"], [[i.name, i.version] for i in images]))


def cmd_lsgpu(c: VmmClient, a: argparse.Namespace) -> None:
    found = c.call("ListGpus", Empty(), pb.ListGpusResponse).gpus
    if a.json:
        print_json(found)
        return
    rows = [[g.slot, g.product_id, g.description, str(g.is_free)] for g in found]
    print(table(["Slot", "Product ID", "Description", "Available"], rows))


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("lsvm", help="list vms")
    s.add_argument("-v", "--verbose", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_lsvm)

    s = sub.add_parser("info", help="show a vm")
    s.add_argument("vm_id")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("start", help="start a vm")
    s.add_argument("vm_id")
    s.set_defaults(func=cmd_start)

    s = sub.add_parser("stop", help="shut a vm down (-f: kill it)")
    s.add_argument("vm_id")
    s.add_argument("-f", "--force", action="store_true")
    s.set_defaults(func=cmd_stop)

    s = sub.add_parser("remove", help="remove a vm and its data")
    s.add_argument("vm_id")
    s.set_defaults(func=cmd_remove)

    s = sub.add_parser("logs", help="show a vm's serial log")
    s.add_argument("vm_id")
    s.add_argument("-n", "--lines", type=int, default=20)
    s.add_argument("-f", "--follow", action="store_true")
    s.set_defaults(func=cmd_logs)

    s = sub.add_parser("lsimage", help="list guest images")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_lsimage)

    s = sub.add_parser("lsgpu", help="list gpus")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_lsgpu)
