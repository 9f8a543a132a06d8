"""`dstack-simulator`: the guest agent over the simulated TDX, for developing apps off-TEE.

    dstack-simulator --dir DIR [--http HOST:PORT] [--external HOST:PORT] [--seed HEX]
                     [--socket-mode 0660] [--socket-group GROUP]
                     [--allowed-host NAME]... [--allowed-origin URL]...

On first run DIR receives a seed, an app-compose, keys derived the way a KMS derives them (the
simulator plays its own KMS, whose k256 root signs the app key), a sys-config and instance info;
later runs reuse them. Every start is a fresh boot: the simulated TD measures the app into RTMR3
exactly as a CVM does. Trust material for verifiers is written to DIR/mock-root-ca.der and
DIR/collateral.json (dcap-qvl's QuoteCollateralV3 JSON).

DIR/dstack.sock and DIR/tappd.sock are mode 0660 (owner and group); an app running as another
user needs `--socket-group` (a group it is in) or `--socket-mode 0666`. The TCP listeners answer
to localhost, IP addresses and this machine's names; `--allowed-host` adds DNS names and
`--allowed-origin` web origins that may call from a browser.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pydstack.attest.identity import mr_config_id_v1
from pydstack.crypto.certs import CertRequest, cert_pem, issue_cert, key_pem, spki_der
from pydstack.crypto.k256 import compressed_pubkey, sign_message
from pydstack.crypto.kdf import derive_dh_secret, derive_key, p256_key_from_bytes
from pydstack.process import run_server, stop_signal
from pydstack.rpc.calls import parse_socket_mode
from pydstack.rpc.guard import RequestGuard
from pydstack.tee.simulated import SimulatedTdx
from pydstack.types import hostshare as hs
from pydstack.types.netaddr import parse_port
from pydstack.types.sysconfig import SysConfig

from .appkeys import AppKeys, KeyProvider
from .core import GuestCore
from .instance import InstanceInfo
from .measure import derive_instance_identity, key_provider_info, measure_stage1, measure_stage2
from .servers import AgentServers, Listener, ListenerOptions, start_agent
from .signer import LocalCertSigner

log = logging.getLogger("dstack-simulator")

DEFAULT_COMPOSE = {
    "manifest_version": 2,
    "name": "simulator",
    "runner": "docker-compose",
    "docker_compose_file": (
        "services:\n  app:\n    image: busybox\n    command: sleep infinity\n"
        "    volumes:\n      - /var/run/dstack.sock:/var/run/dstack.sock\n"
    ),
    "kms_enabled": True,
    "gateway_enabled": False,
    "public_logs": True,
    "public_sysinfo": True,
    "public_tcbinfo": True,
    "key_provider": "kms",
    "key_provider_id": "",
    "allowed_envs": [],
    "no_instance_id": False,
    "secure_time": False,
}


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


@dataclass
class SimulatorState:
    dir: Path
    seed: bytes
    os_image: str
    compose_raw: bytes
    keys: AppKeys
    sys_config: SysConfig
    instance_info: InstanceInfo


def simulated_kms_keys(root_seed: bytes, app_id: bytes, instance_id: bytes) -> AppKeys:
    """the keys a KMS with this root would hand the app (upstream's derivations)."""
    root_ca_key = p256_key_from_bytes(derive_key(root_seed, [b"simulated-kms-root-ca"]))
    root_k256 = derive_key(root_seed, [b"simulated-kms-root-k256"])
    ca = issue_cert(
        CertRequest("Dstack KMS CA", org_name="Dstack", ca_level=1),
        root_ca_key.public_key(),
        root_ca_key,
    )
    app_k256 = derive_key(root_k256, [app_id, b"app-key"])
    return AppKeys(
        disk_crypt_key=derive_dh_secret(root_ca_key, [app_id, instance_id, b"app-disk-crypt-key"]),
        env_crypt_key=derive_dh_secret(root_ca_key, [app_id, b"env-encrypt-key"]),
        k256_key=app_k256,
        k256_signature=sign_message(
            root_k256, "dstack-kms-issued", app_id, compressed_pubkey(app_k256)
        ),
        gateway_app_id="any",
        ca_cert=cert_pem(ca),
        key_provider=KeyProvider("None", {"key": key_pem(root_ca_key)}),
    )


def prepare(
    directory: Path, seed: bytes | None = None, os_image: str = "pydstack-sim"
) -> SimulatorState:
    """create DIR's files on first run, load them afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    conf_path = directory / "simulator.json"
    if conf_path.exists():
        conf = json.loads(conf_path.read_text())
        stored = bytes.fromhex(conf["seed"])
        if seed is not None and seed != stored:
            raise SystemExit(f"error: {directory} was created with another seed; use a new --dir")
        seed, os_image = stored, conf.get("os_image", os_image)
    else:
        seed = seed or os.urandom(32)
        _write_secret(conf_path, json.dumps({"seed": seed.hex(), "os_image": os_image}))
    compose_path = directory / hs.APP_COMPOSE
    if not compose_path.exists():
        compose_path.write_text(json.dumps(DEFAULT_COMPOSE, indent=4, ensure_ascii=False))
    compose_raw = compose_path.read_bytes()
    info_path = directory / hs.INSTANCE_INFO
    app_id, _, instance_id, info = derive_instance_identity(
        compose_raw, InstanceInfo.load(info_path)
    )
    info.save(info_path)
    keys_path = directory / hs.APP_KEYS
    keys: AppKeys | None = None
    if keys_path.exists():
        keys = AppKeys.load(keys_path)
    if (
        keys is None
        or not keys_path.with_suffix(".app").exists()
        or (keys_path.with_suffix(".app").read_text() != app_id.hex())
    ):
        keys = simulated_kms_keys(hashlib.sha256(b"kms" + seed).digest(), app_id, instance_id)
        keys.save(keys_path)
        keys_path.with_suffix(".app").write_text(app_id.hex())
    sys_path = directory / hs.SYS_CONFIG
    if not sys_path.exists():
        vm_config = {
            "os_image_hash": hashlib.sha256(os_image.encode()).hexdigest(),
            "cpu_count": 1,
            "memory_size": 2 * 1024**3,
        }
        sys_path.write_text(
            SysConfig(vm_config=json.dumps(vm_config, separators=(",", ":"))).to_json()
        )
    return SimulatorState(
        directory, seed, os_image, compose_raw, keys, SysConfig.load(sys_path), info
    )


def boot(state: SimulatorState) -> tuple[SimulatedTdx, GuestCore]:
    """a fresh simulated TD with the app measured, and the agent core over it."""
    compose_hash = hashlib.sha256(state.compose_raw).digest()
    tdx = SimulatedTdx(
        state.seed, os_image=state.os_image, mr_config_id=mr_config_id_v1(compose_hash)
    )
    measure_stage1(tdx, state.compose_raw, state.instance_info)
    signer = LocalCertSigner(state.keys)
    ca_spki = spki_der(signer.ca_cert.public_key())  # type: ignore[arg-type]
    measure_stage2(
        tdx,
        key_provider=key_provider_info("kms", ca_spki),
        storage_fs="none",
        os_image_hash=state.sys_config.os_image_hash,
    )
    (state.dir / "mock-root-ca.der").write_bytes(tdx.root_ca_der)
    (state.dir / "collateral.json").write_text(tdx.collateral_json())
    core = GuestCore(
        tdx, state.keys, state.compose_raw, state.sys_config, LocalCertSigner(state.keys)
    )
    return tdx, core


def _socket_mode(value: str) -> int:
    try:
        return parse_socket_mode(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    number = parse_port(port, allow_zero=True)
    if not host or number is None:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), number


async def serve(
    core: GuestCore,
    directory: Path,
    http: tuple[str, int] | None = None,
    external: tuple[str, int] | None = None,
    *,
    socket_mode: int = 0o660,
    socket_group: str | int | None = None,
    guard_hosts: tuple[str, ...] = (),
    guard_origins: tuple[str, ...] = (),
) -> AgentServers:
    """listen on DIR/dstack.sock and DIR/tappd.sock (`socket_mode`, `socket_group`) and the
    optional TCP listeners (`--allowed-host`/`--allowed-origin` rules); a bad group is a
    ValueError before anything binds. `.endpoints` has dstack, tappd, http and external."""
    sockets = ListenerOptions(socket_mode=socket_mode, socket_group=socket_group)
    tcp = ListenerOptions(allowed_hosts=guard_hosts, allowed_origins=guard_origins)
    wanted = [
        Listener(f"unix:{directory / 'dstack.sock'}", ("dstack",), sockets, "dstack"),
        Listener(f"unix:{directory / 'tappd.sock'}", ("tappd",), sockets, "tappd"),
    ]
    if http is not None:
        wanted.append(Listener(f"{http[0]}:{http[1]}", ("dstack", "tappd"), tcp, "http"))
    if external is not None:
        wanted.append(Listener(f"{external[0]}:{external[1]}", ("worker",), tcp, "external"))
    servers = await start_agent(core, wanted)
    for name in ("dstack", "tappd"):
        servers.endpoints[name] = servers.endpoints[name].removeprefix("unix:")
    return servers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dstack-simulator",
        description="run the dstack guest agent over a simulated TDX (development only)",
    )
    parser.add_argument("--dir", type=Path, default=Path("./simulator"), help="state directory")
    parser.add_argument("--http", type=_hostport, help="also serve the agent on HOST:PORT")
    parser.add_argument("--external", type=_hostport, help="serve the external Worker API")
    parser.add_argument("--seed", help="32-byte mock attestation seed (hex), first run only")
    parser.add_argument(
        "--socket-mode",
        type=_socket_mode,
        default=0o660,
        help="permissions of dstack.sock and tappd.sock, octal (default 0660)",
    )
    parser.add_argument("--socket-group", help="group of the sockets (name or gid)")
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        help="a DNS name the TCP listeners answer to besides localhost (repeatable)",
    )
    parser.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        help="a web origin (scheme://host[:port]) that may call from a browser (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    seed = None
    if args.seed:
        try:
            seed = bytes.fromhex(args.seed.removeprefix("0x"))
        except ValueError:
            parser.error("--seed must be hex")
        if len(seed) != 32:
            parser.error("--seed must be 32 bytes (64 hex digits)")
    try:
        RequestGuard.from_config(
            args.allowed_host,
            args.allowed_origin,
            hosts_key="--allowed-host",
            origins_key="--allowed-origin",
        )
    except ValueError as e:
        parser.error(str(e))
    state = prepare(args.dir.resolve(), seed)
    _, core = boot(state)

    async def run() -> None:
        group = await serve(
            core,
            state.dir,
            args.http,
            args.external,
            socket_mode=args.socket_mode,
            socket_group=args.socket_group,
            guard_hosts=tuple(args.allowed_host or ()),
            guard_origins=tuple(args.allowed_origin or ()),
        )
        endpoints = group.endpoints
        dstack_ep = endpoints.get("http", endpoints["dstack"])
        tappd_ep = endpoints.get("http", endpoints["tappd"])
        print(f"dstack-simulator: app {core.info(external=False).app_id.hex()}")
        for name, ep in endpoints.items():
            print(f"  {name:9} {ep}")
        print(f"  root ca   {state.dir / 'mock-root-ca.der'}")
        print(f"  collateral {state.dir / 'collateral.json'}")
        print(f"export DSTACK_SIMULATOR_ENDPOINT={dstack_ep}")
        print(f"export TAPPD_SIMULATOR_ENDPOINT={tappd_ep}", flush=True)
        await stop_signal().wait()
        log.info("shutting down")
        await group.close()

    try:
        run_server(run())
    except (OSError, ValueError) as e:  # a socket could not be set up (e.g. an unknown group)
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
