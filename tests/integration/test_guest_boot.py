"""the guest boot flow against a real kms process: measurement order, keys, env filtering,
progress and errors reported to the host."""

from __future__ import annotations

import hashlib
import json

import pytest
from google.protobuf.empty_pb2 import Empty  # noqa: F401

from pydstack.attest.eventlog import replay_runtime_events
from pydstack.crypto.envcrypt import encrypt_env
from pydstack.guest.boot import Booter, BootError, env_file_line
from pydstack.kms.derive import derive_app_keys, env_public_key
from pydstack.kms.keys import KeyStore
from pydstack.tee.simulated import SimulatedTdx
from pydstack.types.sysconfig import SysConfig

from .kms_proc import OS_IMAGE, SEED, Pccs, allowlist, start_kms, write_config

VM_CONFIG = json.dumps({"os_image_hash": hashlib.sha256(OS_IMAGE.encode()).hexdigest()})


def compose(**kw) -> bytes:
    doc = {
        "manifest_version": 2,
        "name": "boot-test",
        "runner": "docker-compose",
        "docker_compose_file": "services: {}",
        "kms_enabled": True,
        "allowed_envs": ["API_KEY"],
        **kw,
    }
    return json.dumps(doc, indent=4).encode()


@pytest.fixture(scope="module")
def kms(tmp_path_factory):
    d = tmp_path_factory.mktemp("boot-kms")
    pccs = Pccs(d / "root.der")
    allow = d / "allow.json"
    ch = hashlib.sha256(compose()).hexdigest()
    allowlist(
        allow,
        os_images=[json.loads(VM_CONFIG)["os_image_hash"]],
        apps={ch[:40]: {"composeHashes": [ch], "allowAnyDevice": True}},
    )
    proc = start_kms(write_config(d, pccs.url, d / "root.der", allow))
    yield proc, KeyStore(d / "certs").load()
    proc.stop()
    pccs.stop()


def host_share(tmp_path, kms_url: str, raw_compose: bytes, env_blob: bytes | None = None):
    share = tmp_path / "share"
    share.mkdir()
    (share / "app-compose.json").write_bytes(raw_compose)
    (share / ".sys-config.json").write_text(
        SysConfig(kms_urls=(kms_url,), vm_config=VM_CONFIG).to_json()
    )
    if env_blob is not None:
        (share / ".encrypted-env").write_bytes(env_blob)
    return share


async def test_boot_with_kms_keys_and_env(kms, tmp_path):
    proc, root = kms
    raw = compose()
    app_id = hashlib.sha256(raw).digest()[:20]
    pub = env_public_key(root.root_ca_key, root.root_k256, app_id).public_key
    blob = encrypt_env([("API_KEY", "s3cr3t $x"), ("NOT_ALLOWED", "leak")], pub)
    share = host_share(tmp_path, proc.url, raw, blob)
    tdx = SimulatedTdx(SEED, os_image=OS_IMAGE)
    notes: list[tuple[str, str]] = []

    async def notify(event: str, payload: str) -> None:
        notes.append((event, payload))

    result = await Booter(tdx, share, tmp_path / "work", notify).run(storage_fs="ext4")
    expected = derive_app_keys(
        root.root_ca_key, root.root_k256, app_id, result.identity.instance_id
    )
    assert result.keys.k256_key == expected.k256_key
    assert result.keys.disk_crypt_key == expected.disk_crypt_key
    assert [e.event for e in tdx.runtime_events()] == [
        "system-preparing",
        "app-id",
        "compose-hash",
        "instance-id",
        "boot-mr-done",
        "os-image-hash",
        "key-provider",
        "storage-fs",
        "system-ready",
    ]
    assert replay_runtime_events(tdx.runtime_events()) == tdx.rtmrs()[3]
    kp = json.loads(next(e.payload for e in tdx.runtime_events() if e.event == "key-provider"))
    assert kp["name"] == "kms" and len(bytes.fromhex(kp["id"])) == 91
    assert result.envs == [("API_KEY", "s3cr3t $x")] and result.dropped_envs == ["NOT_ALLOWED"]
    work = tmp_path / "work/.host-shared"
    assert (work / ".decrypted-env").read_text() == 'API_KEY="s3cr3t \\$x"\n'
    assert (work / ".decrypted-env").stat().st_mode & 0o777 == 0o600
    assert (work / ".appkeys.json").stat().st_mode & 0o777 == 0o600
    assert [n for n, _ in notes] == ["boot.progress", "instance.info", "boot.progress"]
    assert json.loads(notes[1][1])["instance_id"] == result.identity.instance_id.hex()


async def test_denied_compose_reports_boot_error(kms, tmp_path):
    proc, _ = kms
    share = host_share(tmp_path, proc.url, compose(name="not-allowed"))
    notes: list[tuple[str, str]] = []

    async def notify(event: str, payload: str) -> None:
        notes.append((event, payload))

    with pytest.raises(BootError, match="app not registered"):
        await Booter(SimulatedTdx(SEED, os_image=OS_IMAGE), share, tmp_path / "w", notify).run()
    assert notes[-1][0] == "boot.error" and "Boot denied: app not registered" in notes[-1][1]


async def test_no_key_provider_and_bad_compose(tmp_path):
    async def notify(event: str, payload: str) -> None:
        pass

    share = host_share(tmp_path, "https://unused", compose(kms_enabled=False))
    tdx = SimulatedTdx(SEED)
    result = await Booter(tdx, share, tmp_path / "w", notify).run()
    assert len(result.keys.k256_key) == 32 and result.keys.env_crypt_key == b""
    assert json.loads(tdx.runtime_events()[-3].payload) == {"name": "none", "id": ""}
    for bad, msg in [
        (b"[]", "json object"),
        (b"{not json", "not valid json"),
        (
            json.dumps({"manifest_version": 9, "name": "x", "runner": "bash"}).encode(),
            "unsupported manifest_version",
        ),
        (
            json.dumps({"manifest_version": 2, "name": "x", "runner": "podman"}).encode(),
            "unsupported runner",
        ),
    ]:
        d = tmp_path / hashlib.sha256(bad).hexdigest()[:8]
        d.mkdir()
        share = host_share(d, "https://unused", bad)
        with pytest.raises(BootError, match=msg):
            await Booter(SimulatedTdx(SEED), share, d / "w", notify).run()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BootError, match=r"missing app-compose\.json"):
        await Booter(SimulatedTdx(SEED), empty, tmp_path / "w2", notify).run()


def test_env_file_escaping():
    assert env_file_line("A", "plain-value_1") == "A=plain-value_1"
    assert env_file_line("A", 'x"y`z\nw') == 'A="x\\"y\\`z\\nw"'
