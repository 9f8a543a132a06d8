"""DstackKms / DstackApp through web3.py on any JSON-RPC node (chain id pinned).

Every failure leaves here as one line: `ChainError` (node unreachable, wrong chain id, nothing
answered), `ContractRevert` (a call or transaction reverted: the reason or custom error decoded
by name) or `ChainInputError` (a target that is not the expected contract). Messages name the
node by scheme, host and port only: rpc urls often carry an api key in the path or query.

Hash fields go on-chain only at their exact length: `bytes32` never pads, so a 31-byte compose
hash cannot match a whitelisted hash that begins with 00 (`BootInfoError` says which field).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import requests
from eth_account import Account
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from web3 import Web3
from web3.exceptions import (
    BadFunctionCallOutput,
    ContractLogicError,
    TimeExhausted,
    Web3Exception,
    Web3RPCError,
)
from web3.logs import DISCARD

from .bootinfo import BootInfo
from .chain_abi import (
    ARTIFACTS,
    IAPP_AUTH,
    IAPP_AUTH_BASIC_MANAGEMENT,
    IERC165,
    IMPLEMENTATION_SLOT,
    BootInfoError,
    ChainError,
    ChainInputError,
    ContractRevert,
    addr,
    artifact,
    boot_tuple,
    bytes32,
    bytes32_or_zero,
    decode_revert,
)

__all__ = [
    "ARTIFACTS",
    "AppKind",
    "BootInfoError",
    "Chain",
    "ChainError",
    "ChainInputError",
    "ContractRevert",
    "KmsContract",
    "addr",
    "artifact",
    "boot_tuple",
    "bytes32",
    "bytes32_or_zero",
    "public_url",
]

SUPPORTS_INTERFACE = keccak(text="supportsInterface(bytes4)")[:4]
PROXIABLE_UUID = keccak(text="proxiableUUID()")[:4]
#: the contracts `require_contract` tells apart, by what they declare over ERC-165
AppKind = Literal["kms", "app", "app-auth"]
KINDS: dict[AppKind, str] = {
    "kms": "a DstackKms",
    "app": "a DstackApp",
    "app-auth": "an app contract (IAppAuth)",
}


def public_url(url: str) -> str:
    """`url` as scheme://host[:port]: what messages may say about a node."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}"


def _transport(e: requests.RequestException) -> str:
    if isinstance(e, requests.Timeout):
        return "timed out"
    if isinstance(e, requests.HTTPError) and e.response is not None:
        return f"http {e.response.status_code}"
    if isinstance(e, requests.ConnectionError):
        return "connection failed (is the node running, is the url right?)"
    return type(e).__name__


def _revert_data(e: ContractLogicError) -> bytes:
    data = e.data
    if isinstance(data, str) and data.startswith("0x"):
        try:
            return bytes.fromhex(data[2:])
        except ValueError:
            return b""
    return b""


def _describe(fn: Any) -> str:
    name = getattr(fn, "fn_name", None) or "contract creation"
    address = getattr(fn, "address", None)
    return f"{name} on {address}" if address else str(name)


@dataclass
class Chain:
    """a node on a pinned chain, with an optional signing key."""

    w3: Web3
    chain_id: int = 0
    label: str = ""
    account: Any = None
    tx_timeout: float = 120.0

    @classmethod
    def connect(
        cls, rpc_url: str, chain_id: int, private_key: str | None = None, *, timeout: float = 30
    ) -> Chain:
        """connect and check the chain id; raises ChainError (unreachable, another chain) or
        ChainInputError (a url that is not http(s), a malformed key: the key is never shown)."""
        label = public_url(rpc_url)
        if urllib.parse.urlsplit(rpc_url).scheme not in ("http", "https"):
            raise ChainInputError(f"rpc url {label} must be http:// or https://")
        account = None
        if private_key:
            try:
                account = Account.from_key(private_key)
            except Exception:  # eth-keys raises several types; none may echo the key
                raise ChainInputError("the private key is not a 32-byte hex key") from None
        provider = Web3.HTTPProvider(
            rpc_url, request_kwargs={"timeout": timeout}, exception_retry_configuration=None
        )
        chain = cls(Web3(provider), chain_id, label, account)
        with chain.guard("eth_chainId"):
            actual = chain.w3.eth.chain_id
        if actual != chain_id:
            raise ChainError(
                f"chain id mismatch: the node at {label} reports {actual}, expected {chain_id}"
            )
        return chain

    @property
    def address(self) -> str | None:
        return str(self.account.address) if self.account is not None else None

    def require_sender(self) -> str:
        if self.account is None:
            raise ChainInputError(
                "a private key is needed to send transactions "
                "(--private-key-file or DSTACK_KMS_CHAIN_KEY)"
            )
        return str(self.account.address)

    @contextmanager
    def guard(self, what: str, verb: str = "reverted") -> Iterator[None]:
        """turn whatever web3 and requests raise inside into one-line chain errors."""
        try:
            yield
        except ContractLogicError as e:
            data = _revert_data(e)
            if data or not e.message:
                name, text = decode_revert(data)
            else:
                name, text = "", e.message.removeprefix("execution reverted: ")
            raise ContractRevert(f"{what} {verb}: {text}", error=name, reason=text) from e
        except BadFunctionCallOutput:
            raise ChainError(
                f"{what}: no answer from the contract (not deployed on chain {self.chain_id}?)"
            ) from None
        except requests.RequestException as e:
            raise ChainError(f"cannot reach the node at {self.label}: {_transport(e)}") from None
        except TimeExhausted:
            raise ChainError(f"{what}: not mined within {self.tx_timeout:g} s") from None
        except Web3RPCError as e:
            raise ChainError(f"{what}: the node refused: {e.message}") from None
        except Web3Exception as e:
            raise ChainError(f"{what}: {type(e).__name__}: {e}") from None

    # -- reading ---------------------------------------------------------------------------

    def contract(self, name: str | dict[str, Any], address: str | None = None) -> Any:
        """a web3 contract from a committed artifact name or an artifact document."""
        a = artifact(name) if isinstance(name, str) else name
        if address is None:
            return self.w3.eth.contract(abi=a["abi"], bytecode=a["bytecode"])
        return self.w3.eth.contract(address=to_checksum_address(address), abi=a["abi"])

    def code(self, address: str) -> bytes:
        with self.guard(f"eth_getCode {address}"):
            return bytes(self.w3.eth.get_code(to_checksum_address(address)))

    def storage_word(self, address: str, slot: int) -> bytes:
        with self.guard(f"eth_getStorageAt {address}"):
            return bytes(self.w3.eth.get_storage_at(to_checksum_address(address), slot)).rjust(
                32, b"\0"
            )

    def block_number(self) -> int:
        with self.guard("eth_blockNumber"):
            return int(self.w3.eth.block_number)

    def implementation(self, proxy: str) -> str:
        """the ERC-1967 implementation of `proxy` (the zero address when it is not a proxy)."""
        return to_checksum_address(self.storage_word(proxy, IMPLEMENTATION_SLOT)[12:])

    def read(self, fn: Any, sender: str | None = None) -> Any:
        """`fn` as an eth_call (from `sender` when given); reverts are decoded by name."""
        with self.guard(_describe(fn)):
            return fn.call({"from": sender} if sender else {})

    def simulate(self, fn: Any, sender: str | None = None) -> Any:
        """what `fn` would return if `sender` (default: the key's address) sent it now."""
        sender = sender or self.address
        with self.guard(_describe(fn), "would revert"):
            if not hasattr(fn, "call"):  # a constructor: gas estimation runs it
                fn.estimate_gas({"from": sender} if sender else {})
                return None
            return fn.call({"from": sender} if sender else {})

    def logs(self, address: str, from_block: int) -> list[Any]:
        """every log of `address` from `from_block` to the latest block."""
        with self.guard(f"eth_getLogs {address} from block {from_block}"):
            return list(
                self.w3.eth.get_logs(
                    {
                        "address": to_checksum_address(address),
                        "fromBlock": from_block,
                        "toBlock": "latest",
                    }
                )
            )

    def _supports(self, address: str, interface_id: bytes) -> bool:
        data = SUPPORTS_INTERFACE + interface_id + bytes(28)
        try:
            out = self.w3.eth.call({"to": to_checksum_address(address), "data": data, "gas": 30000})
        except (ContractLogicError, Web3RPCError):
            return False
        return len(out) == 32 and int.from_bytes(out, "big") == 1

    def supports_interface(self, address: str, interface_id: bytes) -> bool:
        """ERC-165 detection: supportsInterface answers true for ERC-165 itself, false for
        0xffffffff and true for `interface_id` (each call with 30000 gas, as the standard asks)."""
        with self.guard(f"supportsInterface on {address}"):
            return (
                self._supports(address, IERC165)
                and not self._supports(address, b"\xff\xff\xff\xff")
                and self._supports(address, interface_id)
            )

    def require_contract(self, address: str, kind: AppKind, what: str) -> None:
        """raises ChainInputError unless `address` has code and declares, over ERC-165, the
        interfaces of `kind`: "kms" (IAppAuth, not IAppAuthBasicManagement: that is an app),
        "app" (both) or "app-auth" (IAppAuth)."""
        if not self.code(address):
            raise ChainInputError(
                f"{what} {address} has no contract code on chain {self.chain_id} "
                "(a wrong address, or a node on another network?)"
            )
        if not self.supports_interface(address, IAPP_AUTH):
            raise ChainInputError(
                f"{what} {address} is a contract but not {KINDS[kind]}: "
                "it does not declare IAppAuth (ERC-165 0x1e079198)"
            )
        managed = self.supports_interface(address, IAPP_AUTH_BASIC_MANAGEMENT)
        if kind == "kms" and managed:
            raise ChainInputError(
                f"{what} {address} is an app contract "
                "(it declares IAppAuthBasicManagement), not a DstackKms"
            )
        if kind == "app" and not managed:
            raise ChainInputError(
                f"{what} {address} is not a DstackApp: it does not declare "
                "IAppAuthBasicManagement (ERC-165 0x8fd37527); a DstackKms?"
            )

    def require_implementation(self, address: str, kind: AppKind, what: str) -> None:
        """raises ChainInputError unless `address` is a UUPS implementation (proxiableUUID is the
        ERC-1967 slot) of `kind` (see `require_contract`)."""
        self.require_contract(address, kind, what)
        with self.guard(f"proxiableUUID on {address}"):
            try:
                out = bytes(
                    self.w3.eth.call({"to": to_checksum_address(address), "data": PROXIABLE_UUID})
                )
            except ContractLogicError:
                out = b""
        if len(out) != 32 or int.from_bytes(out, "big") != IMPLEMENTATION_SLOT:
            raise ChainInputError(
                f"{what} {address} is not a UUPS implementation "
                "(proxiableUUID does not return the ERC-1967 slot; a proxy?)"
            )

    # -- writing ---------------------------------------------------------------------------

    def send(self, fn: Any) -> Any:
        """simulate `fn` as the key's address, then sign, send and wait for the receipt; raises
        ContractRevert (decoded) before sending when the simulation reverts."""
        sender = self.require_sender()
        what = _describe(fn)
        self.simulate(fn, sender)
        with self.guard(what, "would revert"):
            tx = fn.build_transaction(
                {
                    "from": sender,
                    "nonce": self.w3.eth.get_transaction_count(
                        to_checksum_address(sender), "pending"
                    ),
                    "chainId": self.chain_id,
                }
            )
        signed = self.account.sign_transaction(tx)
        with self.guard(what):
            h = self.w3.eth.send_raw_transaction(signed.raw_transaction)
            receipt = self.w3.eth.wait_for_transaction_receipt(h, timeout=self.tx_timeout)
        if receipt["status"] != 1:
            raise ContractRevert(f"{what}: transaction 0x{h.hex()} reverted when mined")
        return receipt

    def deploy(self, name: str | dict[str, Any], *args: Any) -> str:
        receipt = self.send(self.contract(name).constructor(*args))
        return str(receipt["contractAddress"])

    def deploy_kms(self, owner: str | None = None) -> str:
        """DstackApp implementation, DstackKms implementation and its proxy; returns the proxy."""
        owner = owner or self.require_sender()
        app_impl = self.deploy("DstackApp")
        kms_impl = self.deploy("DstackKms")
        init = self.contract("DstackKms").encode_abi("initialize", [owner, app_impl])
        return self.deploy("ERC1967Proxy", kms_impl, init)


@dataclass
class KmsContract:
    """a DstackKms proxy and the apps it registers."""

    chain: Chain
    address: str

    @classmethod
    def at(cls, chain: Chain, address: str) -> KmsContract:
        """the DstackKms at `address`; raises ChainInputError unless it is one (ERC-165)."""
        chain.require_contract(address, "kms", "kms contract")
        return cls(chain, to_checksum_address(address))

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
        receipt = self.chain.send(
            self.create_app_call(
                owner or self.chain.require_sender(),
                disable_upgrades=disable_upgrades,
                require_tcb_up_to_date=require_tcb_up_to_date,
                allow_any_device=allow_any_device,
                device_id=device_id,
                compose_hash=compose_hash,
            )
        )
        return self.created_app(receipt)

    def create_app_call(
        self,
        owner: str,
        *,
        disable_upgrades: bool,
        require_tcb_up_to_date: bool,
        allow_any_device: bool,
        device_id: bytes | str,
        compose_hash: bytes | str,
    ) -> Any:
        """the 6-argument `deployAndRegisterApp` call (empty device or hash: none)."""
        return self.c.get_function_by_signature(
            "deployAndRegisterApp(address,bool,bool,bool,bytes32,bytes32)"
        )(
            owner,
            disable_upgrades,
            require_tcb_up_to_date,
            allow_any_device,
            bytes32_or_zero(device_id, "device id"),
            bytes32_or_zero(compose_hash, "compose hash"),
        )

    def created_app(self, receipt: Any) -> str:
        events = self.c.events.AppDeployedViaFactory().process_receipt(receipt, errors=DISCARD)
        if not events:
            raise ChainError("the transaction deployed no app (no AppDeployedViaFactory event)")
        return str(events[0]["args"]["appId"])

    def call(self, fn: str, *args: Any) -> Any:
        return self.chain.send(getattr(self.c.functions, fn)(*args))

    def app_call(self, app_id: str, fn: str, *args: Any) -> Any:
        return self.chain.send(getattr(self.app(app_id).functions, fn)(*args))

    def is_app_allowed(self, boot: BootInfo) -> tuple[bool, str]:
        ok, reason = self.chain.read(self.c.functions.isAppAllowed(boot_tuple(boot)))
        return bool(ok), str(reason)

    def is_kms_allowed(self, boot: BootInfo) -> tuple[bool, str]:
        ok, reason = self.chain.read(self.c.functions.isKmsAllowed(boot_tuple(boot)))
        return bool(ok), str(reason)

    def gateway_app_id(self) -> str:
        return str(self.chain.read(self.c.functions.gatewayAppId()))

    def app_implementation(self) -> str:
        return str(self.chain.read(self.c.functions.appImplementation()))
