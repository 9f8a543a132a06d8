"""what the `dstack` CLI puts on the wire: typed messages through the prpc json codec (every
field of the request type, nothing the proto lacks), and answers decoded into messages."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pydstack.rpc.proto import vmm_rpc_pb2 as pb
from pydstack.vmm import cli, discovery

VMM = pb.DESCRIPTOR.services_by_name["Vmm"]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.answers: dict[str, object] = {}


@pytest.fixture
def vmm(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(discovery, "SCAN_GLOB", str(tmp_path / "none" / "*"))
    rec = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            method = self.path.split("?")[0].removeprefix("/prpc/")
            body = self.rfile.read(int(self.headers["Content-Length"]))
            rec.calls.append((method, json.loads(body)))
            answer = json.dumps(rec.answers.get(method, {})).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("DSTACK_VMM_URL", f"http://127.0.0.1:{server.server_address[1]}")
    yield rec
    server.shutdown()
    server.server_close()


def run(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(args))
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def request_fields(method: str) -> list[str]:
    return [f.name for f in VMM.methods_by_name[method].input_type.fields]


def test_deploy_sends_a_full_create_vm_message_with_simulated_tee(vmm, capsys, tmp_path):
    compose = tmp_path / "app-compose.json"
    compose.write_text(json.dumps({"manifest_version": 2, "name": "a", "runner": "docker-compose"}))
    vmm.answers["CreateVm"] = {"id": "vm-1"}
    code, out, err = run(
        capsys, "deploy", "--name", "a", "--image", "img", "--compose", str(compose),
        "--port", "tcp:18080:80", "--simulated-tee", "dstack-tdx", "--net", "bridge",
        "--gpu", "18:00.0",
    )  # fmt: skip
    assert code == 0, err
    assert "Created VM with ID: vm-1" in out
    [(method, body)] = vmm.calls
    assert method == "CreateVm"
    assert list(body) == request_fields("CreateVm")  # every field, in proto order
    assert body["simulated_tee"] == "dstack-tdx"
    assert body["ports"] == [
        {"protocol": "tcp", "host_port": 18080, "vm_port": 80, "host_address": "127.0.0.1"}
    ]
    assert body["networking"] == {"mode": "bridge", "bridge_name": ""}
    assert body["gpus"] == {"gpus": [{"slot": "18:00.0"}], "attach_mode": "listed"}
    assert body["compose_file"] == compose.read_text()


def test_simulated_tee_takes_only_upstreams_choices(vmm, capsys, tmp_path):
    compose = tmp_path / "c.json"
    compose.write_text("{}")
    code, _, err = run(
        capsys, "deploy", "--name", "a", "--image", "i", "--compose", str(compose),
        "--simulated-tee", "sgx",
    )  # fmt: skip
    assert code == 2 and "invalid choice: 'sgx'" in err
    assert vmm.calls == []


def test_update_sends_resize_then_upgrade_messages(vmm, capsys):
    code, _, err = run(
        capsys, "update", "vm-1", "--vcpu", "2", "--no-gpus", "--no-ports", "--tee",
        "--kms-url", "https://k:1",
    )  # fmt: skip
    assert code == 0, err
    [(m1, resize), (m2, upgrade)] = vmm.calls
    assert (m1, m2) == ("ResizeVm", "UpgradeApp")
    assert resize == {"id": "vm-1", "vcpu": 2, "memory": None, "disk_size": None, "image": None}
    assert list(upgrade) == request_fields("UpgradeApp")
    assert upgrade["gpus"] == {"gpus": [], "attach_mode": "listed"}
    assert upgrade["update_ports"] is True and upgrade["ports"] == []
    assert upgrade["no_tee"] is False  # an optional field that is set, not dropped
    assert upgrade["update_kms_urls"] is True and upgrade["kms_urls"] == ["https://k:1"]


def test_answers_decode_into_messages(vmm, capsys):
    vmm.answers["GetInfo"] = {
        "found": True,
        "info": {
            "id": "vm-1",
            "name": "a",
            "status": "running",
            "configuration": {"vcpu": 2, "simulated_tee": "dstack-tdx", "future_field": 1},
            "events": [{"event": "boot.progress", "body": "done", "timestamp": "1700000000000"}],
        },
    }
    code, out, err = run(capsys, "info", "vm-1")
    assert code == 0, err
    assert "Simulated TEE:  dstack-tdx" in out and "vCPU:           2" in out
    assert "2023-11-14 22:13:20 UTC boot.progress: done" in out
    dumped = json.loads(run(capsys, "info", "vm-1", "--json")[1])
    assert "future_field" not in dumped["configuration"]  # what the proto lacks is not kept
    assert dumped["configuration"]["simulated_tee"] == "dstack-tdx"


def test_an_answer_of_the_wrong_shape_is_a_clear_error(vmm, capsys):
    vmm.answers["GetInfo"] = {"found": "yes"}
    code, _, err = run(capsys, "info", "x")
    assert code == 1 and "GetInfo failed: unexpected response: field found" in err
