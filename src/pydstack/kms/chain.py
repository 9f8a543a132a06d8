"""DstackKms / DstackApp through web3.py on any JSON-RPC node (chain id pinned).

Hash fields go on-chain only at their exact length: `bytes32` never pads, so a 31-byte compose
hash cannot match a whitelisted hash that begins with 00 (`BootInfoError` says which field).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_account import Account
from web3 import Web3
from web3.exceptions import ContractLogicError
from web3.logs import DISCARD

from pydstack.errors import InputError, UnavailableError

from .bootinfo import BootInfo

ARTIFACTS = Path(__file__).resolve().parents[3] / "contracts/artifacts"


class ChainError(UnavailableError):
    """the chain or a contract call failed."""


class BootInfoError(InputError):
    """a value does not have the exact size of its on-chain type."""


def artifact(name: str) -> dict[str, Any]:
    path = ARTIFACTS / f"{name}.json"
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except OSError as e:
        raise ChainError(f"contract artifact {name} not found at {path}") from e
    return doc


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
    return Web3.to_checksum_address("0x" + raw.hex())


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


@dataclass
class Chain:
    w3: Web3
    account: Any = None

    @classmethod
    def connect(cls, rpc_url: str, chain_id: int, private_key: str | None = None) -> Chain:
        w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": 30}))
        try:
            actual = w3.eth.chain_id
        except Exception as e:
            raise ChainError(f"cannot reach {rpc_url}: {e}") from e
        if actual != chain_id:
            raise ChainError(f"chain id mismatch: node reports {actual}, expected {chain_id}")
        acct = Account.from_key(private_key) if private_key else None
        return cls(w3, acct)

    def contract(self, name: str, address: str | None = None) -> Any:
        a = artifact(name)
        if address is None:
            return self.w3.eth.contract(abi=a["abi"], bytecode=a["bytecode"])
        return self.w3.eth.contract(address=Web3.to_checksum_address(address), abi=a["abi"])

    def send(self, fn: Any) -> Any:
        if self.account is None:
            raise ChainError("a private key is needed to send transactions")
        try:
            tx = fn.build_transaction(
                {
                    "from": self.account.address,
                    "nonce": self.w3.eth.get_transaction_count(self.account.address, "pending"),
                    "chainId": self.w3.eth.chain_id,
                }
            )
        except ContractLogicError as e:
            raise ChainError(f"transaction would revert: {e.message}") from e
        signed = self.account.sign_transaction(tx)
        h = self.w3.eth.send_raw_transaction(signed.raw_transaction)
        receipt = self.w3.eth.wait_for_transaction_receipt(h, timeout=60)
        if receipt["status"] != 1:
            raise ChainError(f"transaction {h.hex()} reverted")
        return receipt

    def deploy(self, name: str, *args: Any) -> str:
        receipt = self.send(self.contract(name).constructor(*args))
        return str(receipt["contractAddress"])

    def deploy_kms(self, owner: str | None = None) -> str:
        """DstackApp implementation, DstackKms implementation and its proxy; returns the proxy."""
        owner = owner or self.account.address
        app_impl = self.deploy("DstackApp")
        kms_impl = self.deploy("DstackKms")
        init = self.contract("DstackKms").encode_abi("initialize", [owner, app_impl])
        return self.deploy("ERC1967Proxy", kms_impl, init)


@dataclass
class KmsContract:
    chain: Chain
    address: str

    @property
    def c(self) -> Any:
        return self.chain.contract("DstackKms", self.address)

    def app(self, app_id: str) -> Any:
        return self.chain.contract("DstackApp", app_id)

    def deploy_and_register_app(
        self,
        owner: str | None = None,
        *,
        disable_upgrades: bool = False,
        require_tcb_up_to_date: bool = False,
        allow_any_device: bool = True,
        device_id: bytes | str = b"",
        compose_hash: bytes | str = b"",
    ) -> str:
        owner = owner or self.chain.account.address
        fn = self.c.get_function_by_signature(
            "deployAndRegisterApp(address,bool,bool,bool,bytes32,bytes32)"
        )(
            owner,
            disable_upgrades,
            require_tcb_up_to_date,
            allow_any_device,
            bytes32_or_zero(device_id, "device id"),
            bytes32_or_zero(compose_hash, "compose hash"),
        )
        receipt = self.chain.send(fn)
        events = self.c.events.AppDeployedViaFactory().process_receipt(receipt, errors=DISCARD)
        return str(events[0]["args"]["appId"])

    def call(self, fn: str, *args: Any) -> Any:
        return self.chain.send(getattr(self.c.functions, fn)(*args))

    def app_call(self, app_id: str, fn: str, *args: Any) -> Any:
        return self.chain.send(getattr(self.app(app_id).functions, fn)(*args))

    def is_app_allowed(self, boot: BootInfo) -> tuple[bool, str]:
        ok, reason = self.c.functions.isAppAllowed(boot_tuple(boot)).call()
        return bool(ok), str(reason)

    def is_kms_allowed(self, boot: BootInfo) -> tuple[bool, str]:
        ok, reason = self.c.functions.isKmsAllowed(boot_tuple(boot)).call()
        return bool(ok), str(reason)

    def gateway_app_id(self) -> str:
        return str(self.c.functions.gatewayAppId().call())
