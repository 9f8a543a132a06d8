"""env-key trust: which KMS keys may sign an app's env encryption key (`dstack kms ...`), the
signature check on a key fetched from a KMS, and the encryption of an env file to it.

A KMS signs each app's X25519 env public key with its secp256k1 key (`signature_v1` over the
app id, a timestamp and the key; or the legacy `signature` without timestamp). The signer is
recovered here; once `~/.dstack-vmm/kms-whitelist.json` lists trusted signers, a key signed
by any other is refused (upstream's CLI compares `0x`-prefixed against bare hex and so never
matches; here both sides are bare lower-case hex).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydstack.crypto.envcrypt import (
    EnvError,
    encrypt_env,
    recover_env_pubkey_signer,
    verify_env_encrypt_public_key,
)
from pydstack.rpc.proto import kms_rpc_pb2 as kpb
from pydstack.rpc.sync_client import PrpcCallError, PrpcUnreachable, SyncPrpcClient

from ..compose import parse_env_file
from .common import CliError, VmmClient, config_dir, load_json, read_text


def whitelist_path() -> Path:
    return config_dir() / "kms-whitelist.json"


def trusted_signers() -> list[str]:
    doc = load_json(whitelist_path(), {"trusted_signers": []})
    return [str(s).lower().removeprefix("0x") for s in doc.get("trusted_signers", [])]


def save_signers(signers: list[str]) -> None:
    path = whitelist_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"trusted_signers": signers}, indent=2) + "\n")


def confirm(question: str, assume_yes: bool) -> bool:
    """yes when `assume_yes`; else ask on a terminal; no without one."""
    if assume_yes:
        return True
    if not sys.stdin.isatty():
        return False
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def fetch_env_pubkey(kms_url: str, app_id: str, *, assume_yes: bool = False) -> bytes:
    """the app's env public key from the KMS, after checking who signed it.

    Raises CliError for an unreachable KMS, a refusal, a malformed or badly signed key, an
    unsigned key (unless `assume_yes`) and a signer not in a non-empty whitelist."""
    try:
        app = bytes.fromhex(app_id.removeprefix("0x"))
    except ValueError:
        raise CliError(f"app id {app_id[:80]!r} is not hex") from None
    # the signature below is what authenticates the key, not the kms's tls certificate
    with SyncPrpcClient(kms_url, timeout=30) as kms:
        try:
            resp = kms.call("GetAppEnvEncryptPubKey", kpb.AppId(app_id=app), kpb.PublicKeyResponse)
        except PrpcUnreachable as e:
            raise CliError(f"cannot reach the kms at {kms_url}: {e.__cause__}") from e
        except PrpcCallError as e:
            raise CliError(f"kms refused GetAppEnvEncryptPubKey: {e.message[:300]}") from e
    public_key = resp.public_key
    if len(public_key) != 32:
        raise CliError("kms returned an env public key that is not 32 bytes")
    signer: bytes | None = None
    try:
        if resp.signature_v1:
            signer = verify_env_encrypt_public_key(
                public_key, resp.signature_v1, app, resp.timestamp
            )
            if signer is None:
                raise CliError("the kms's signature on the env public key is invalid or stale")
        elif resp.signature:
            print("warning: the kms uses a legacy signature without timestamp", file=sys.stderr)
            signer = recover_env_pubkey_signer(app, public_key, resp.signature)
    except ValueError as e:
        raise CliError(f"the kms's signature on the env public key is invalid: {e}") from e
    if signer is None:
        if not confirm("the kms did not sign the env public key; use it anyway?", assume_yes):
            raise CliError("refusing an unsigned env public key (pass --yes to accept)")
        return public_key
    trusted = trusted_signers()
    print(f"env public key signed by kms key {signer.hex()}", file=sys.stderr)
    question = f"signer {signer.hex()} is not in {whitelist_path()}; continue?"
    if trusted and signer.hex() not in trusted and not confirm(question, False):
        raise CliError(
            f"the env public key is signed by {signer.hex()}, which is not a trusted kms "
            f"signer (add it with `dstack kms add {signer.hex()}`)"
        )
    return public_key


def env_file(path: str) -> list[tuple[str, str]]:
    return parse_env_file(read_text(path))


def encrypt_env_file(
    path: str, kms_url: str, app_id: str, assume_yes: bool
) -> tuple[bytes, list[tuple[str, str]]]:
    """the `encrypted_env` of an env file, and the pairs it held."""
    envs = env_file(path)
    public_key = fetch_env_pubkey(kms_url, app_id, assume_yes=assume_yes)
    try:
        return encrypt_env(envs, public_key), envs
    except EnvError as e:
        raise CliError(str(e)) from e


# -- `dstack kms list|add|remove` -----------------------------------------------------------


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


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("kms", help="trusted kms signers for env encryption")
    ks = s.add_subparsers(dest="kms_command", required=True)
    ks.add_parser("list")
    for name in ("add", "remove"):
        k = ks.add_parser(name)
        k.add_argument("pubkey", help="33-byte compressed secp256k1 key, hex")
    s.set_defaults(func=cmd_kms, local=True)
