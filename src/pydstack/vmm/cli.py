"""`dstack`: the VMM command line (upstream vmm-cli's subcommands, flags and output).

Talks JSON prpc to a dstack-vmm at `--url` (`http://`, `https://`, or `unix:/path.sock`; default
`DSTACK_VMM_URL`, then `~/.dstack-vmm/config.json`'s `url`, then http://localhost:8080).
Environment variables given with `--env-file` are encrypted here, on the client, to the app's
env public key; the KMS's signature on that key is checked first (against the signers in
`~/.dstack-vmm/kms-whitelist.json` when it lists any) so a man-in-the-middle VMM or network
cannot substitute its own key.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import pwd
import sys
from pathlib import Path
from typing import Any, NoReturn

import httpx

from pydstack.crypto.envcrypt import (
    EnvError,
    encrypt_env,
    recover_env_pubkey_signer,
    verify_env_encrypt_public_key,
)
from pydstack.errors import DstackError

from . import cli_verify, discovery
from .compose import (
    KEY_PROVIDERS,
    ArgError,
    app_id_of,
    compose_bytes,
    compose_hash,
    make_app_compose,
    parse_disk_gb,
    parse_env_file,
    parse_memory_mb,
    parse_port,
)

DEFAULT_URL = "http://localhost:8080"


class CliError(DstackError):
    """a command failed; the message is printed as `error: ...`."""


def config_dir() -> Path:
    return Path(os.path.expanduser("~/.dstack-vmm"))


def _load_json(path: Path, default: dict[str, Any]) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read {path}: {e}") from e
    return value if isinstance(value, dict) else default


class VmmClient:
    def __init__(self, url: str, token: str = "", user: str = "", password: str = "") -> None:
        headers = {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        auth = httpx.BasicAuth(user, password) if (user or password) and not token else None
        if url.startswith("unix:"):
            transport = httpx.HTTPTransport(uds=url[5:])
            self.base = "http://localhost"
            self.http = httpx.Client(transport=transport, headers=headers, auth=auth, timeout=60)
        else:
            self.base = url.rstrip("/")
            # like vmm-cli, https is not verified (a VMM's certificate is usually self-made)
            self.http = httpx.Client(headers=headers, auth=auth, timeout=60, verify=False)
        self.url = url

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            r = self.http.post(f"{self.base}/prpc/{method}?json", json=params or {})
        except httpx.HTTPError as e:
            raise CliError(f"cannot reach the vmm at {self.url}: {e}") from e
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code != 200:
            msg = body.get("error") if isinstance(body, dict) else r.text.strip()
            if r.status_code == 401:
                msg = "unauthorized (set --token or DSTACK_VMM_TOKEN)"
            raise CliError(f"{method} failed: {msg or f'http {r.status_code}'}")
        return body if isinstance(body, dict) else {}

    def logs(self, vm_id: str, lines: int, follow: bool) -> None:
        params = {"id": vm_id, "follow": str(follow).lower(), "ansi": "false", "lines": str(lines)}
        try:
            with self.http.stream("GET", f"{self.base}/logs", params=params, timeout=None) as r:
                if r.status_code != 200:
                    r.read()
                    raise CliError(f"logs failed: {r.text.strip()}")
                for chunk in r.iter_bytes():
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
        except httpx.HTTPError as e:
            raise CliError(f"cannot reach the vmm at {self.url}: {e}") from e


# -- env encryption -------------------------------------------------------------------------


def whitelist_path() -> Path:
    return config_dir() / "kms-whitelist.json"


def trusted_signers() -> list[str]:
    doc = _load_json(whitelist_path(), {"trusted_signers": []})
    return [str(s).lower().removeprefix("0x") for s in doc.get("trusted_signers", [])]


def save_signers(signers: list[str]) -> None:
    path = whitelist_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"trusted_signers": signers}, indent=2) + "\n")


def _confirm(question: str, assume_yes: bool) -> bool:
    if assume_yes:
        return True
    if not sys.stdin.isatty():
        return False
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def fetch_env_pubkey(kms_url: str, app_id: str, *, assume_yes: bool = False) -> bytes:
    """the app's env public key from the KMS, after checking who signed it."""
    try:
        r = httpx.post(
            f"{kms_url.rstrip('/')}/prpc/GetAppEnvEncryptPubKey?json",
            json={"app_id": app_id},
            timeout=30,
            verify=False,  # the signature below is what authenticates the key
        )
    except httpx.HTTPError as e:
        raise CliError(f"cannot reach the kms at {kms_url}: {e}") from e
    if r.status_code != 200:
        raise CliError(f"kms refused GetAppEnvEncryptPubKey: {r.text.strip()[:300]}")
    try:
        body = r.json()
        public_key = bytes.fromhex(str(body["public_key"]))
        app = bytes.fromhex(app_id.removeprefix("0x"))
    except (ValueError, KeyError, TypeError) as e:
        raise CliError(f"kms answered GetAppEnvEncryptPubKey unexpectedly: {e}") from e
    if len(public_key) != 32:
        raise CliError("kms returned an env public key that is not 32 bytes")
    signer: bytes | None = None
    sig_v1 = str(body.get("signature_v1") or "")
    sig_legacy = str(body.get("signature") or "")
    try:
        if sig_v1:
            signer = verify_env_encrypt_public_key(
                public_key, bytes.fromhex(sig_v1), app, int(body.get("timestamp") or 0)
            )
            if signer is None:
                raise CliError("the kms's signature on the env public key is invalid or stale")
        elif sig_legacy:
            print("warning: the kms uses a legacy signature without timestamp", file=sys.stderr)
            signer = recover_env_pubkey_signer(app, public_key, bytes.fromhex(sig_legacy))
    except ValueError as e:
        raise CliError(f"the kms's signature on the env public key is invalid: {e}") from e
    if signer is None:
        if not _confirm("the kms did not sign the env public key; use it anyway?", assume_yes):
            raise CliError("refusing an unsigned env public key (pass --yes to accept)")
        return public_key
    trusted = trusted_signers()
    print(f"env public key signed by kms key {signer.hex()}", file=sys.stderr)
    question = f"signer {signer.hex()} is not in {whitelist_path()}; continue?"
    if trusted and signer.hex() not in trusted and not _confirm(question, False):
        raise CliError(
            f"the env public key is signed by {signer.hex()}, which is not a trusted kms "
            f"signer (add it with `dstack kms add {signer.hex()}`)"
        )
    return public_key


def encrypt_env_file(
    path: str, kms_url: str, app_id: str, assume_yes: bool
) -> tuple[str, list[tuple[str, str]]]:
    """the hex `encrypted_env` of an env file, and the pairs it held."""
    envs = _env_file(path)
    public_key = fetch_env_pubkey(kms_url, app_id, assume_yes=assume_yes)
    try:
        return encrypt_env(envs, public_key).hex(), envs
    except EnvError as e:
        raise CliError(str(e)) from e


def _env_file(path: str) -> list[tuple[str, str]]:
    return parse_env_file(_read(path))


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}") from e


# -- output helpers -------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(cells: list[str]) -> str:
        return "|" + "|".join(f" {c:<{w}} " for c, w in zip(cells, widths, strict=True)) + "|"

    return "\n".join([sep, line(headers), sep, *(line(r) for r in rows), sep])


def _status(vm: dict[str, Any]) -> str:
    status = str(vm.get("status", ""))
    if vm.get("boot_error"):
        return f"{status} (boot error)"
    return status


def _gpus(vm: dict[str, Any]) -> str:
    gpus = (vm.get("configuration") or {}).get("gpus") or {}
    if gpus.get("attach_mode") == "all":
        return "All GPUs"
    slots = [g.get("slot", "") for g in gpus.get("gpus", [])]
    return ", ".join(slots) or "-"


def _ms(value: object) -> str:
    if not value:
        return "-"
    ts = int(str(value)) / 1000
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- commands -------------------------------------------------------------------------------


def cmd_lsvm(c: VmmClient, a: argparse.Namespace) -> None:
    vms = c.call("Status", {}).get("vms", [])
    if a.json:
        print(json.dumps(vms, indent=2))
        return
    headers = ["VM ID", "App ID", "Name", "Status", "Uptime"]
    if a.verbose:
        headers += ["Instance ID", "vCPU", "Memory", "Disk", "Image", "GPUs"]
    rows = []
    for vm in vms:
        row = [vm.get("id", ""), vm.get("app_id", ""), vm.get("name", ""), _status(vm)]
        row.append(vm.get("uptime", "") or "-")
        if a.verbose:
            cfg = vm.get("configuration") or {}
            row += [
                vm.get("instance_id", "") or "-",
                str(cfg.get("vcpu", "")),
                f"{cfg.get('memory', '')}MB",
                f"{cfg.get('disk_size', '')}GB",
                str(cfg.get("image", "")),
                _gpus(vm),
            ]
        rows.append([str(x) for x in row])
    print(table(headers, rows))
    errors = [(vm["id"], vm["boot_error"]) for vm in vms if vm.get("boot_error")]
    for vm_id, err in errors:
        print(f"{vm_id}: boot error: {err}")


def cmd_info(c: VmmClient, a: argparse.Namespace) -> None:
    r = c.call("GetInfo", {"id": a.vm_id})
    if not r.get("found"):
        raise CliError(f"vm {a.vm_id} not found")
    info = r.get("info", {})
    if a.json:
        print(json.dumps(info, indent=2))
        return
    cfg = info.get("configuration") or {}
    fields = [
        ("VM ID", info.get("id")),
        ("Name", info.get("name")),
        ("Status", info.get("status")),
        ("Uptime", info.get("uptime") or "-"),
        ("App ID", info.get("app_id")),
        ("Instance ID", info.get("instance_id") or "-"),
        ("Image", cfg.get("image")),
        ("vCPU", cfg.get("vcpu")),
        ("Memory", f"{cfg.get('memory', 0)}MB"),
        ("Disk", f"{cfg.get('disk_size', 0)}GB"),
        ("Boot Progress", info.get("boot_progress") or "-"),
        ("Boot Error", info.get("boot_error") or "-"),
        ("Shutdown", info.get("shutdown_progress") or "-"),
        ("Exited At", info.get("exited_at") or "-"),
    ]
    for name, value in fields:
        print(f"{name + ':':<15} {value}")
    ports = cfg.get("ports") or []
    if ports:
        print("Ports:")
        for p in ports:
            print(
                f"  {p.get('protocol')}:{p.get('host_address')}:{p.get('host_port')}"
                f" -> {p.get('vm_port')}"
            )
    events = info.get("events") or []
    if events:
        print("Events:")
        for e in events[-10:]:
            print(f"  {_ms(e.get('timestamp'))} {e.get('event')}: {e.get('body')}")


def cmd_start(c: VmmClient, a: argparse.Namespace) -> None:
    c.call("StartVm", {"id": a.vm_id})
    print(f"started vm {a.vm_id}")


def cmd_stop(c: VmmClient, a: argparse.Namespace) -> None:
    c.call("StopVm" if a.force else "ShutdownVm", {"id": a.vm_id})
    print(f"{'stopped' if a.force else 'shutting down'} vm {a.vm_id}")


def cmd_remove(c: VmmClient, a: argparse.Namespace) -> None:
    c.call("RemoveVm", {"id": a.vm_id})
    print(f"removed vm {a.vm_id}")


def cmd_logs(c: VmmClient, a: argparse.Namespace) -> None:
    c.logs(a.vm_id, a.lines, a.follow)


def cmd_lsimage(c: VmmClient, a: argparse.Namespace) -> None:
    images = c.call("ListImages", {}).get("images", [])
    if a.json:
        print(json.dumps(images, indent=2))
        return
    print(table(["Name", "Version"], [[i.get("name", ""), i.get("version", "")] for i in images]))


def cmd_lsgpu(c: VmmClient, a: argparse.Namespace) -> None:
    gpus = c.call("ListGpus", {}).get("gpus", [])
    if a.json:
        print(json.dumps(gpus, indent=2))
        return
    rows = [
        [
            g.get("slot", ""),
            g.get("product_id", ""),
            g.get("description", ""),
            str(g.get("is_free", False)),
        ]
        for g in gpus
    ]
    print(table(["Slot", "Product ID", "Description", "Available"], rows))


def _swap_bytes(value: str | None) -> int:
    return parse_memory_mb(value) * 1024 * 1024 if value else 0


def cmd_compose(c: VmmClient | None, a: argparse.Namespace) -> None:
    if a.env_file and not a.kms:
        raise CliError("--env-file needs --kms (env vars are encrypted to the kms's key)")
    envs = _env_file(a.env_file) if a.env_file else []
    doc = make_app_compose(
        name=a.name,
        docker_compose=_read(a.docker_compose),
        kms=a.kms,
        gateway=a.gateway,
        local_key_provider=a.local_key_provider,
        key_provider=a.key_provider,
        key_provider_id=a.key_provider_id or "",
        public_logs=a.public_logs,
        public_sysinfo=a.public_sysinfo,
        allowed_envs=[k for k, _ in envs],
        no_instance_id=a.no_instance_id,
        secure_time=a.secure_time,
        prelaunch_script=_read(a.prelaunch_script) if a.prelaunch_script else None,
        swap_bytes=_swap_bytes(a.swap),
        event_log_version=a.event_log_version,
    )
    raw = compose_bytes(doc)
    Path(a.output).write_bytes(raw)
    print(f"App compose file created at: {a.output}")
    print(f"Compose hash: {compose_hash(raw)}")


def _ports(specs: list[str] | None) -> list[dict[str, Any]]:
    return [parse_port(s).to_json_obj() for s in specs or []]


def _gpu_config(gpus: list[str] | None, ppcie: bool) -> dict[str, Any] | None:
    if ppcie or (gpus and "all" in gpus):
        return {"attach_mode": "all"}
    if gpus:
        return {"attach_mode": "listed", "gpus": [{"slot": g} for g in gpus]}
    return None


def cmd_deploy(c: VmmClient, a: argparse.Namespace) -> None:
    compose_text = _read(a.compose)
    try:
        compose = json.loads(compose_text)
    except ValueError as e:
        raise CliError(f"{a.compose} is not an app-compose json file: {e}") from e
    if not isinstance(compose, dict):
        raise CliError(f"{a.compose} is not an app-compose json object")
    if a.swap is not None:  # swap lives in the app compose (it is measured)
        swap = _swap_bytes(a.swap)
        if swap != compose.get("swap_size", 0):
            if swap:
                compose["swap_size"] = swap
            else:
                compose.pop("swap_size", None)
            compose_text = compose_bytes(compose).decode()
    app_id = (a.app_id or app_id_of(compose_text.encode())).removeprefix("0x")
    print(f"App ID: {app_id}")
    params: dict[str, Any] = {
        "name": a.name,
        "image": a.image,
        "compose_file": compose_text,
        "vcpu": a.vcpu,
        "memory": parse_memory_mb(a.memory),
        "disk_size": parse_disk_gb(a.disk),
        "app_id": app_id,
        "ports": _ports(a.port),
        "hugepages": a.hugepages,
        "pin_numa": a.pin_numa,
        "stopped": a.stopped,
        "no_tee": a.no_tee,
    }
    if a.net:
        params["networking"] = {"mode": a.net}
    if a.user_config:
        params["user_config"] = _read(a.user_config)
    if a.kms_url:
        params["kms_urls"] = a.kms_url
    if a.gateway_url:
        params["gateway_urls"] = a.gateway_url
    gpus = _gpu_config(a.gpu, a.ppcie)
    if gpus:
        params["gpus"] = gpus
    if a.env_file:
        if not compose.get("kms_enabled") and compose.get("key_provider") != "kms":
            raise CliError("--env-file needs an app compose with the kms enabled")
        kms = a.kms_encrypt_url or (a.kms_url[0] if a.kms_url else "")
        if not kms:
            raise CliError("--env-file needs --kms-url (or --kms-encrypt-url) to encrypt to")
        params["encrypted_env"], _ = encrypt_env_file(a.env_file, kms, app_id, a.yes)
    r = c.call("CreateVm", params)
    print(f"Created VM with ID: {r.get('id', '')}")


def _current(c: VmmClient, vm_id: str) -> dict[str, Any]:
    r = c.call("GetInfo", {"id": vm_id})
    if not r.get("found"):
        raise CliError(f"vm {vm_id} not found")
    info: dict[str, Any] = r.get("info", {})
    return info


def _env_update(
    c: VmmClient,
    vm_id: str,
    env_file: str,
    kms_urls: list[str] | None,
    assume_yes: bool,
    compose_text: str | None = None,
) -> dict[str, Any]:
    """`encrypted_env` plus the compose with `allowed_envs` rewritten to the new keys."""
    info = _current(c, vm_id)
    if not kms_urls:
        raise CliError("--env-file needs --kms-url to fetch the env public key from")
    app_id = str(info.get("app_id", ""))
    encrypted, pairs = encrypt_env_file(env_file, kms_urls[0], app_id, assume_yes)
    keys = [k for k, _ in pairs]
    cfg = info.get("configuration") or {}
    compose = json.loads(compose_text or cfg.get("compose_file") or "{}")
    out: dict[str, Any] = {"encrypted_env": encrypted}
    changed = False
    if compose.get("allowed_envs") != keys:
        compose["allowed_envs"] = keys
        changed = True
    envs = dict(pairs)
    if "APP_LAUNCH_TOKEN" in envs:
        token_hash = hashlib.sha256(envs["APP_LAUNCH_TOKEN"].encode()).hexdigest()
        if compose.get("launch_token_hash") != token_hash:
            compose["launch_token_hash"] = token_hash
            changed = True
    if changed or compose_text is not None:
        out["compose_file"] = compose_bytes(compose).decode()
    return out


def cmd_update_env(c: VmmClient, a: argparse.Namespace) -> None:
    params = _env_update(c, a.vm_id, a.env_file, a.kms_url, a.yes)
    c.call("UpgradeApp", {"id": a.vm_id, **params})
    print(f"updated env of vm {a.vm_id}")


def cmd_update_app_compose(c: VmmClient, a: argparse.Namespace) -> None:
    c.call("UpgradeApp", {"id": a.vm_id, "compose_file": _read(a.compose_path)})
    print(f"updated app compose of vm {a.vm_id}")


def cmd_update_user_config(c: VmmClient, a: argparse.Namespace) -> None:
    c.call("UpgradeApp", {"id": a.vm_id, "user_config": _read(a.path)})
    print(f"updated user config of vm {a.vm_id}")


def cmd_update_ports(c: VmmClient, a: argparse.Namespace) -> None:
    c.call("UpgradeApp", {"id": a.vm_id, "update_ports": True, "ports": _ports(a.port)})
    print(f"updated port mappings of vm {a.vm_id}")


def _resize_params(a: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if a.vcpu is not None:
        out["vcpu"] = a.vcpu
    if a.memory is not None:
        out["memory"] = parse_memory_mb(a.memory)
    if a.disk is not None:
        out["disk_size"] = parse_disk_gb(a.disk)
    if a.image is not None:
        out["image"] = a.image
    return out


def cmd_resize(c: VmmClient, a: argparse.Namespace) -> None:
    params = _resize_params(a)
    if not params:
        raise CliError("nothing to resize: give --vcpu, --memory, --disk or --image")
    c.call("ResizeVm", {"id": a.vm_id, **params})
    print(f"resized vm {a.vm_id}")


def cmd_update(c: VmmClient, a: argparse.Namespace) -> None:
    resize = _resize_params(a)
    upgrade: dict[str, Any] = {}
    compose_text: str | None = None
    if a.compose or a.prelaunch_script is not None or a.swap is not None:
        info = _current(c, a.vm_id)
        compose = json.loads((info.get("configuration") or {}).get("compose_file") or "{}")
        if a.compose:
            compose["docker_compose_file"] = _read(a.compose)
        if a.prelaunch_script is not None:
            script = _read(a.prelaunch_script)
            if script.strip():
                compose["pre_launch_script"] = script
            else:
                compose.pop("pre_launch_script", None)
        if a.swap is not None:
            swap = _swap_bytes(a.swap)
            if swap > 0:
                compose["swap_size"] = swap
            else:
                compose.pop("swap_size", None)
        compose_text = compose_bytes(compose).decode()
        upgrade["compose_file"] = compose_text
    if a.env_file:
        upgrade.update(_env_update(c, a.vm_id, a.env_file, a.kms_url, a.yes, compose_text))
    if a.user_config:
        upgrade["user_config"] = _read(a.user_config)
    if a.no_ports:
        upgrade.update(update_ports=True, ports=[])
    elif a.port:
        upgrade.update(update_ports=True, ports=_ports(a.port))
    if a.no_gpus:
        upgrade["gpus"] = {"attach_mode": "listed", "gpus": []}
    elif a.gpu or a.ppcie:
        upgrade["gpus"] = _gpu_config(a.gpu, a.ppcie)
    if a.kms_url:
        upgrade.update(update_kms_urls=True, kms_urls=a.kms_url)
    if a.tee is not None:
        upgrade["no_tee"] = not a.tee
    if not resize and not upgrade:
        raise CliError("nothing to update")
    if resize:
        c.call("ResizeVm", {"id": a.vm_id, **resize})
    if upgrade:
        c.call("UpgradeApp", {"id": a.vm_id, **upgrade})
    print(f"updated vm {a.vm_id}")


def cmd_kms(c: VmmClient | None, a: argparse.Namespace) -> None:
    signers = trusted_signers()
    if a.kms_command == "list":
        if not signers:
            print(f"no trusted kms signers ({whitelist_path()})")
        for s in signers:
            print(s)
        return
    key = a.pubkey.lower().removeprefix("0x")
    try:
        raw = bytes.fromhex(key)
    except ValueError:
        raise CliError("a kms signer key is hex") from None
    if len(raw) != 33 or raw[0] not in (2, 3):
        raise CliError("a kms signer key is a 33-byte compressed secp256k1 public key")
    if a.kms_command == "add":
        if key not in signers:
            signers.append(key)
            save_signers(signers)
        print(f"trusted kms signer {key}")
    else:
        if key not in signers:
            raise CliError(f"{key} is not a trusted kms signer")
        signers.remove(key)
        save_signers(signers)
        print(f"removed kms signer {key}")


# -- parser ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dstack", description="manage CVMs on a dstack-vmm")
    p.add_argument("--url", default=None, help=f"vmm url (DSTACK_VMM_URL; {DEFAULT_URL})")
    p.add_argument("--token", default=None, help="api token (DSTACK_VMM_TOKEN)")
    p.add_argument("--auth-user", default=None, help="basic auth user (DSTACK_VMM_AUTH_USER)")
    p.add_argument(
        "--auth-password", default=None, help="basic auth password (DSTACK_VMM_AUTH_PASSWORD)"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    s = sub.add_parser("resize", help="change a stopped vm's resources")
    s.add_argument("vm_id")
    _resource_flags(s)
    s.set_defaults(func=cmd_resize)

    s = sub.add_parser("logs", help="show a vm's serial log")
    s.add_argument("vm_id")
    s.add_argument("-n", "--lines", type=int, default=20)
    s.add_argument("-f", "--follow", action="store_true")
    s.set_defaults(func=cmd_logs)

    s = sub.add_parser("compose", help="write an app-compose.json (local)")
    s.add_argument("--name", required=True)
    s.add_argument("--docker-compose", required=True, metavar="PATH")
    s.add_argument("--prelaunch-script", metavar="PATH")
    s.add_argument("--kms", action="store_true", help="get keys from the kms")
    s.add_argument("--gateway", action="store_true")
    s.add_argument("--local-key-provider", action="store_true")
    s.add_argument("--key-provider", choices=KEY_PROVIDERS)
    s.add_argument("--key-provider-id", metavar="HEX")
    s.add_argument("--public-logs", action="store_true")
    s.add_argument("--public-sysinfo", action="store_true")
    s.add_argument("--env-file", metavar="PATH", help="its keys become allowed_envs")
    s.add_argument("--no-instance-id", action="store_true")
    s.add_argument("--secure-time", action="store_true")
    s.add_argument("--swap", metavar="SIZE")
    s.add_argument("--event-log-version", type=int, choices=(1, 2), default=1)
    s.add_argument("--output", required=True, metavar="PATH")
    s.set_defaults(func=cmd_compose, local=True)

    s = sub.add_parser("deploy", help="create a vm from an app-compose.json")
    s.add_argument("--name", required=True)
    s.add_argument("--image", required=True)
    s.add_argument("--compose", required=True, metavar="PATH", help="app-compose.json")
    s.add_argument("--vcpu", type=int, default=1)
    s.add_argument("--memory", default="1024", help="MB, or with M/G/T suffix")
    s.add_argument("--disk", default="20", help="GB, or with G/T suffix")
    s.add_argument("--swap", metavar="SIZE")
    s.add_argument("--env-file", metavar="PATH")
    s.add_argument("--user-config", metavar="PATH")
    s.add_argument("--app-id", metavar="HEX")
    s.add_argument("--port", action="append", metavar="SPEC", help="proto:[addr:]host:vm")
    s.add_argument("--gpu", action="append", metavar="SLOT")
    s.add_argument("--ppcie", action="store_true")
    s.add_argument("--pin-numa", action="store_true")
    s.add_argument("--hugepages", action="store_true")
    s.add_argument("--kms-url", action="append", metavar="URL")
    s.add_argument("--kms-encrypt-url", metavar="URL")
    s.add_argument("--gateway-url", action="append", metavar="URL")
    s.add_argument("--stopped", action="store_true", help="create without starting")
    s.add_argument("--no-tee", dest="no_tee", action="store_true")
    s.add_argument("--tee", dest="no_tee", action="store_false")
    s.add_argument("--net", choices=("bridge", "user"), default=None)
    s.add_argument("-y", "--yes", action="store_true", help="accept an unsigned env key")
    s.set_defaults(func=cmd_deploy)

    s = sub.add_parser("lsimage", help="list guest images")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_lsimage)

    s = sub.add_parser("lsgpu", help="list gpus")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_lsgpu)

    s = sub.add_parser("update-env", help="replace a vm's encrypted env")
    s.add_argument("vm_id")
    s.add_argument("--env-file", required=True, metavar="PATH")
    s.add_argument("--kms-url", action="append", metavar="URL")
    s.add_argument("-y", "--yes", action="store_true")
    s.set_defaults(func=cmd_update_env)

    s = sub.add_parser("update-app-compose", help="replace a vm's app-compose.json")
    s.add_argument("vm_id")
    s.add_argument("compose_path")
    s.set_defaults(func=cmd_update_app_compose)

    s = sub.add_parser("update-user-config", help="replace a vm's user config")
    s.add_argument("vm_id")
    s.add_argument("path")
    s.set_defaults(func=cmd_update_user_config)

    s = sub.add_parser("update-ports", help="replace a vm's port mappings")
    s.add_argument("vm_id")
    s.add_argument("--port", action="append", required=True, metavar="SPEC")
    s.set_defaults(func=cmd_update_ports)

    s = sub.add_parser("update", help="change several things of a vm at once")
    s.add_argument("vm_id")
    _resource_flags(s)
    s.add_argument("--compose", metavar="PATH", help="docker-compose file")
    s.add_argument("--prelaunch-script", metavar="PATH")
    s.add_argument("--env-file", metavar="PATH")
    s.add_argument("--user-config", metavar="PATH")
    ports = s.add_mutually_exclusive_group()
    ports.add_argument("--port", action="append", metavar="SPEC")
    ports.add_argument("--no-ports", action="store_true")
    s.add_argument("--swap", metavar="SIZE")
    gpus = s.add_mutually_exclusive_group()
    gpus.add_argument("--gpu", action="append", metavar="SLOT")
    gpus.add_argument("--ppcie", action="store_true")
    gpus.add_argument("--no-gpus", action="store_true")
    tee = s.add_mutually_exclusive_group()
    tee.add_argument("--no-tee", dest="tee", action="store_false", default=None)
    tee.add_argument("--tee", dest="tee", action="store_true")
    s.add_argument("--kms-url", action="append", metavar="URL")
    s.add_argument("-y", "--yes", action="store_true")
    s.set_defaults(func=cmd_update)

    s = sub.add_parser("vmm", help="running dstack-vmm instances on this host")
    vs = s.add_subparsers(dest="vmm_command", required=True)
    v = vs.add_parser("ls", help="list them")
    v.add_argument("--json", action="store_true")
    v = vs.add_parser("switch", help="make one the default for this user")
    v.add_argument("vmm_id", help="an id prefix from `dstack vmm ls`")
    s.set_defaults(func=cmd_vmm, local=True)

    s = sub.add_parser("kms", help="trusted kms signers for env encryption")
    ks = s.add_subparsers(dest="kms_command", required=True)
    ks.add_parser("list")
    for name in ("add", "remove"):
        k = ks.add_parser(name)
        k.add_argument("pubkey", help="33-byte compressed secp256k1 key, hex")
    s.set_defaults(func=cmd_kms, local=True)
    cli_verify.add_parser(sub)
    return p


def _resource_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--vcpu", type=int)
    s.add_argument("--memory", metavar="SIZE")
    s.add_argument("--disk", metavar="SIZE")
    s.add_argument("--image")


def resolve_url(arg: str | None) -> str:
    """--url, DSTACK_VMM_URL, config `url`, the discovered instance `vmm switch` chose, the only
    discovered instance, then the default."""
    if arg:
        return arg
    if os.environ.get("DSTACK_VMM_URL"):
        return os.environ["DSTACK_VMM_URL"]
    cfg = _load_json(config_dir() / "config.json", {})
    if cfg.get("url"):
        return str(cfg["url"])
    found = discovery.instances()
    active = str(cfg.get("active_vmm") or "")
    chosen = [i for i in found if active and i.id.startswith(active)]
    if chosen:
        return chosen[0].url
    if len(found) == 1:
        return found[0].url
    return DEFAULT_URL


def cmd_vmm(c: VmmClient | None, a: argparse.Namespace) -> None:
    found = discovery.instances()
    cfg_path = config_dir() / "config.json"
    cfg = _load_json(cfg_path, {})
    active = str(cfg.get("active_vmm") or "")
    if a.vmm_command == "ls":
        if a.json:
            print(json.dumps([dataclasses.asdict(i) for i in found], indent=2))
            return
        if not found:
            print("no running dstack-vmm instances found")
            return
        rows = []
        for i in found:
            mark = "*" if active and i.id.startswith(active) else ""
            try:
                user = pwd.getpwuid(Path(f"/proc/{i.pid}").stat().st_uid).pw_name
            except (OSError, KeyError):
                user = "?"
            rows.append([mark, i.id[:8], str(i.pid), user, i.node_name, i.url, i.working_dir])
        print(table(["", "ID", "PID", "USER", "NAME", "ADDRESS", "WORKING DIR"], rows))
        return
    matches = [i for i in found if i.id.startswith(a.vmm_id)]
    if len(matches) != 1:
        what = "no" if not matches else "more than one"
        raise CliError(f"{what} running dstack-vmm matches {a.vmm_id!r} (see `dstack vmm ls`)")
    cfg["active_vmm"] = matches[0].id
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"active vmm: {matches[0].id[:8]} ({matches[0].url})")


def _die(msg: str) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        client: VmmClient | None = None
        if not getattr(args, "local", False):
            cfg = _load_json(config_dir() / "config.json", {})
            token = args.token or os.environ.get("DSTACK_VMM_TOKEN") or cfg.get("auth_token", "")
            user = (
                args.auth_user or os.environ.get("DSTACK_VMM_AUTH_USER") or cfg.get("auth_user", "")
            )
            password = (
                args.auth_password
                or os.environ.get("DSTACK_VMM_AUTH_PASSWORD")
                or cfg.get("auth_password", "")
            )
            if bool(user) != bool(password) and not token:
                raise CliError("basic auth needs both --auth-user and --auth-password")
            client = VmmClient(resolve_url(args.url), str(token), str(user), str(password))
        args.func(client, args)
    except (CliError, ArgError, EnvError) as e:
        _die(str(e))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
