"""what the DstackKms / DstackApp contracts look like from outside, and the errors of the chain
modules.

* the compiled artifacts (`contracts/artifacts/<Name>.json`: abi, bytecode, storage layout);
* ERC-165 interface ids and the ERC-1967 implementation slot;
* operator values: addresses (EIP-55 checksum enforced on mixed case) and 32-byte hashes, parsed
  strictly (never padded, never empty, never all zeros);
* the BootInfo tuple of `isAppAllowed` / `isKmsAllowed` (exact sizes, `BootInfoError` otherwise);
* revert data decoded by name: `Error(string)`, `Panic(uint256)` and every custom error in the
  artifacts (`OwnableUnauthorizedAccount(account=0x..)`);
* storage layout compatibility of an upgrade.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from eth_abi.abi import decode as abi_decode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from pydstack.errors import InputError, UnavailableError

from .bootinfo import BootInfo

ARTIFACTS = Path(__file__).resolve().parents[3] / "contracts/artifacts"
#: ERC-165 interface ids (upstream's IAppAuth / IAppAuthBasicManagement)
IERC165 = bytes.fromhex("01ffc9a7")
IAPP_AUTH = bytes.fromhex("1e079198")
IAPP_AUTH_BASIC_MANAGEMENT = bytes.fromhex("8fd37527")
#: ERC-1967: keccak256("eip1967.proxy.implementation") - 1
IMPLEMENTATION_SLOT = int("360894a13ba1a3210667c828492db98dca3e2076cc3735a920a3ca505d382bbc", 16)
ERROR_STRING = bytes.fromhex("08c379a0")
PANIC = bytes.fromhex("4e487b71")
#: what an operator should check when a known custom error comes back
HINTS = {
    "OwnableUnauthorizedAccount": "the sender is not the owner",
    "OwnableInvalidOwner": "that owner address is not allowed",
    "ERC1967InvalidImplementation": "the new implementation has no code",
    "UUPSUnsupportedProxiableUUID": "the new implementation is not a UUPS implementation",
    "UUPSUnauthorizedCallContext": "called on an implementation instead of its proxy",
    "InvalidInitialization": "the initializer already ran (check the call data)",
    "NotInitializing": "an initializer step ran outside initialization",
    "ERC1967NonPayable": "value sent to a non-payable upgrade",
    "AddressEmptyCode": "the target has no code",
    "FailedCall": "the delegated call failed",
}
PANICS = {
    0x01: "assertion failed",
    0x11: "arithmetic overflow",
    0x12: "division by zero",
    0x21: "invalid enum value",
    0x32: "array index out of bounds",
    0x41: "out of memory",
    0x51: "call to an uninitialized function",
}


class ChainError(UnavailableError):
    """the chain or a contract call failed (unreachable node, wrong chain, reverted call)."""


class ContractRevert(ChainError):
    """a call or transaction reverted; `error` is the decoded error's name ("" for a plain
    reason or none), `reason` the one-line decoded text."""

    def __init__(self, message: str, *, error: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.error = error
        self.reason = reason


class ChainInputError(InputError):
    """an operator value or target contract is refused; nothing was sent."""


class BootInfoError(ChainInputError):
    """a value does not have the exact size of its on-chain type."""


def artifact(name: str) -> dict[str, Any]:
    """the committed artifact `name` (DstackKms, DstackApp, ERC1967Proxy, ...)."""
    return load_artifact(ARTIFACTS / f"{name}.json")


def load_artifact(path: Path) -> dict[str, Any]:
    """an artifact JSON file (abi, bytecode, optional storageLayout); raises ChainInputError when
    it is missing or has no abi and bytecode."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ChainInputError(f"cannot read contract artifact {path}: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("abi"), list):
        raise ChainInputError(f"{path} is not a contract artifact (no abi)")
    code = doc.get("bytecode")
    if not isinstance(code, str) or not re.fullmatch(r"0x([0-9a-fA-F]{2})+", code):
        raise ChainInputError(f"{path} is not a contract artifact (no bytecode)")
    return doc


# -- operator values -------------------------------------------------------------------------


def parse_address(text: str, what: str = "address") -> str:
    """`text` as a checksummed address: 0x and 40 hex digits; mixed case must be a valid EIP-55
    checksum (a mistyped address fails it); the zero address is refused."""
    text = text.strip()
    if not re.fullmatch(r"0x[0-9a-fA-F]{40}", text):
        raise ChainInputError(f"{what} {text!r} is not an address (0x and 40 hex digits)")
    checksummed = to_checksum_address(text)
    body = text[2:]
    if body not in (body.lower(), body.upper()) and text != checksummed:
        raise ChainInputError(
            f"{what} {text} has a wrong EIP-55 checksum: mistyped? copy it again from its source"
        )
    if int(body, 16) == 0:
        raise ChainInputError(f"{what} is the zero address")
    return checksummed


def parse_hash(text: str, what: str = "value") -> bytes:
    """`text` as a bytes32: exactly 64 hex digits (0x optional), not all zeros. Shorter values are
    refused, never padded: a 31-byte hash would otherwise become another, whitelisted one."""
    body = text.strip().removeprefix("0x")
    if not body:
        raise ChainInputError(f"{what} is empty (expected 32 bytes as 64 hex digits)")
    if not re.fullmatch(r"[0-9a-fA-F]*", body):
        raise ChainInputError(f"{what} {text!r} is not hex")
    if len(body) != 64:
        raise ChainInputError(
            f"{what} must be 32 bytes (64 hex digits), got {len(body)} hex digits"
        )
    raw = bytes.fromhex(body)
    if not any(raw):
        raise ChainInputError(f"{what} is all zeros (the contracts read zero as 'none')")
    return raw


def parse_hex(text: str, what: str) -> bytes:
    """any number of bytes as hex (0x optional, may be empty)."""
    body = text.strip().removeprefix("0x")
    if len(body) % 2 or not re.fullmatch(r"[0-9a-fA-F]*", body):
        raise ChainInputError(f"{what} is not hex (an even number of hex digits)")
    return bytes.fromhex(body)


def _raw(value: bytes | str, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError as e:
        raise BootInfoError(f"{what} is not hex: {e}") from e


def bytes32(value: bytes | str, what: str = "value") -> bytes:
    """`value` (bytes or hex) as a bytes32; raises BootInfoError unless it is exactly 32 bytes."""
    raw = _raw(value, what)
    if len(raw) != 32:
        raise BootInfoError(f"{what} must be 32 bytes, got {len(raw)}")
    return raw


def bytes32_or_zero(value: bytes | str, what: str = "value") -> bytes:
    """empty means "none" (32 zero bytes); anything else must be exactly 32 bytes."""
    return bytes32(value, what) if _raw(value, what) else bytes(32)


def addr(value: bytes | str, what: str = "address", *, allow_empty: bool = False) -> str:
    """a checksummed address from exactly 20 bytes (or hex); empty gives the zero address only
    with `allow_empty`; raises BootInfoError otherwise."""
    raw = _raw(value, what)
    if not raw and allow_empty:
        raw = bytes(20)
    if len(raw) != 20:
        raise BootInfoError(f"{what} must be 20 bytes, got {len(raw)}")
    return to_checksum_address("0x" + raw.hex())


def boot_tuple(boot: BootInfo) -> tuple[Any, ...]:
    """the contract's BootInfo tuple; raises BootInfoError when a field has the wrong size (an
    empty instance id is the zero address: apps without instance ids)."""
    return (
        addr(boot.app_id, "app id"),
        bytes32(boot.compose_hash, "compose hash"),
        addr(boot.instance_id, "instance id", allow_empty=True),
        bytes32(boot.device_id, "device id"),
        bytes32(boot.mr_aggregated, "mr aggregated"),
        bytes32(boot.mr_system, "mr system"),
        bytes32(boot.os_image_hash, "os image hash"),
        boot.tcb_status,
        list(boot.advisory_ids),
    )


# -- abi -------------------------------------------------------------------------------------


def abi_type(param: dict[str, Any]) -> str:
    """the canonical type of an abi parameter (tuples spelled out)."""
    t = str(param["type"])
    if t.startswith("tuple"):
        return "(" + ",".join(abi_type(c) for c in param["components"]) + ")" + t[5:]
    return t


def signature(entry: dict[str, Any]) -> str:
    """`name(type,...)` of an abi function, event or error entry."""
    return f"{entry['name']}({','.join(abi_type(p) for p in entry.get('inputs', []))})"


def selector(entry: dict[str, Any]) -> bytes:
    """the 4-byte selector of a function or error entry."""
    return keccak(text=signature(entry))[:4]


def _fmt(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    if isinstance(value, str) and re.fullmatch(r"0x[0-9a-fA-F]{40}", value):
        return to_checksum_address(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _known_errors() -> dict[bytes, dict[str, Any]]:
    errors: dict[bytes, dict[str, Any]] = {}
    for name in ("DstackKms", "DstackApp", "ERC1967Proxy"):
        try:
            entries = artifact(name)["abi"]
        except ChainInputError:
            continue
        for e in entries:
            if e.get("type") == "error":
                errors[selector(e)] = e
    return errors


def decode_revert(data: bytes, extra_abi: list[dict[str, Any]] | None = None) -> tuple[str, str]:
    """(error name, one-line text) for revert data: the reason of `Error(string)`, the meaning of
    a `Panic(uint256)` code, or a custom error of the artifacts (or `extra_abi`) decoded by name
    with its arguments and a hint; unknown data is named by its selector."""
    if not data:
        return "", "reverted without a reason"
    sel, body = data[:4], data[4:]
    try:
        if sel == ERROR_STRING:
            (reason,) = abi_decode(["string"], body)
            return "", str(reason)
        if sel == PANIC:
            (code,) = abi_decode(["uint256"], body)
            return "Panic", f"panic 0x{code:02x} ({PANICS.get(code, 'unknown panic code')})"
    except Exception:  # eth_abi raises several types on malformed data
        return "", f"malformed revert data 0x{data.hex()[:80]}"
    known = _known_errors()
    for e in extra_abi or []:
        if e.get("type") == "error":
            known[selector(e)] = e
    entry = known.get(sel)
    if entry is None:
        return "", f"unknown custom error 0x{sel.hex()}"
    params = entry.get("inputs", [])
    try:
        values = abi_decode([abi_type(p) for p in params], body)
    except Exception:
        return str(entry["name"]), f"{entry['name']} (undecodable arguments)"
    args = ", ".join(
        f"{p.get('name') or i}={_fmt(v)}"
        for i, (p, v) in enumerate(zip(params, values, strict=True))
    )
    text = f"{entry['name']}({args})"
    hint = HINTS.get(str(entry["name"]))
    return str(entry["name"]), f"{text}: {hint}" if hint else text


# -- storage layout --------------------------------------------------------------------------


def layout_problems(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[str]:
    """why storage laid out as `new` cannot take over a proxy laid out as `old` ([] when it can).

    Every variable of `old` but its `__gap` must keep its slot, offset and type (a rename is
    fine); a variable of `new` that `old` lacks may only sit in `old`'s gap or after it. Limits:
    types are compared by their solc label (a struct whose members changed keeps its label), and
    a shrunk gap is not checked against what the new variables use of it."""
    problems = []
    at = {(str(v["slot"]), int(v["offset"])): v for v in new}
    gap = next((int(v["slot"]) for v in old if v["label"] == "__gap"), None)
    kept = set()
    for v in old:
        if v["label"] == "__gap":
            continue
        key = (str(v["slot"]), int(v["offset"]))
        w = at.get(key)
        where = f"slot {v['slot']} offset {v['offset']}"
        if w is None:
            problems.append(f"{v['label']} ({v['type']}) at {where} is gone")
        elif w["type"] != v["type"]:
            problems.append(f"{v['label']} ({v['type']}) at {where} becomes {w['type']}")
        kept.add(key)
    end = gap if gap is not None else max((int(v["slot"]) + 1 for v in old), default=0)
    for w in new:
        key = (str(w["slot"]), int(w["offset"]))
        if key not in kept and w["label"] != "__gap" and int(w["slot"]) < end:
            problems.append(
                f"{w['label']} is inserted at slot {w['slot']}, inside existing storage"
            )
    return problems
