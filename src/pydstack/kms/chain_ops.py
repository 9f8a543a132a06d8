"""operator actions on DstackKms / DstackApp, as plans.

Each action runs its checks first (values parsed strictly, targets identified over ERC-165,
current state read) and raises `ChainInputError` for anything it refuses, before anything is
sent. It returns a `Plan`: the calls to send and what they change (before -> after). `execute`
sends a plan, each call simulated first so a revert is decoded by name and nothing is sent; with
`dry_run` it only simulates and reports. A plan with no calls says why nothing needs sending
(adding a value already allowed, for instance); removing a value that is not there is an error,
since a mistyped value would otherwise leave the real one allowed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import coincurve
from cryptography.hazmat.primitives.serialization import load_der_public_key
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from .chain import AppKind, Chain, KmsContract
from .chain_abi import (
    ChainError,
    ChainInputError,
    artifact,
    layout_problems,
    load_artifact,
    parse_address,
    parse_hash,
    parse_hex,
)
from .chain_policy import upgrades_disabled

#: hash-valued allowlists: kind -> (on the app?, getter, add, remove, what)
LISTS = {
    "os-image": (False, "allowedOsImages", "addOsImageHash", "removeOsImageHash", "os image"),
    "kms-mr": (
        False,
        "kmsAllowedAggregatedMrs",
        "addKmsAggregatedMr",
        "removeKmsAggregatedMr",
        "kms aggregated mr",
    ),
    "kms-device": (False, "kmsAllowedDeviceIds", "addKmsDevice", "removeKmsDevice", "kms device"),
    "compose-hash": (
        True,
        "allowedComposeHashes",
        "addComposeHash",
        "removeComposeHash",
        "compose hash",
    ),
    "device": (True, "allowedDeviceIds", "addDevice", "removeDevice", "device"),
}
#: app flags: kind -> (getter, setter)
FLAGS = {
    "allow-any-device": ("allowAnyDevice", "setAllowAnyDevice"),
    "require-tcb-uptodate": ("requireTcbUpToDate", "setRequireTcbUpToDate"),
}
KMS_INFO_KEYS = ("k256Pubkey", "caPubkey", "quote", "eventlog")
FACTORY_INITIALIZER = "initialize(address,bool,bool,bool,bytes32,bytes32)"


@dataclass(frozen=True)
class Change:
    what: str
    before: Any
    after: Any

    def to_json_obj(self) -> dict[str, Any]:
        return {"what": self.what, "from": self.before, "to": self.after}


@dataclass
class Step:
    """one transaction; `build` makes the web3 call from the receipts of the steps before it."""

    label: str
    build: Callable[[list[Any]], Any]
    #: it needs an earlier step's result (a deployed address): a dry run cannot simulate it
    needs_earlier: bool = False


@dataclass
class Plan:
    steps: list[Step]
    changes: list[Change] = field(default_factory=list)
    #: why nothing is sent (no steps), or what the operator must do next
    note: str = ""
    #: the sender a dry run simulates when no key is given (the owner)
    default_sender: str | None = None
    #: extra output from the receipts (a new address)
    result: Callable[[list[Any]], dict[str, Any]] | None = None
    #: after sending: raises when the change did not take effect
    verify: Callable[[list[Any]], None] | None = None


def _hex(b: bytes) -> str:
    return "0x" + b.hex()


def _returned(value: Any) -> Any:
    if isinstance(value, bytes):
        return _hex(value)
    if isinstance(value, (list, tuple)):
        return [_returned(v) for v in value]
    return value


def execute(chain: Chain, plan: Plan, *, dry_run: bool) -> dict[str, Any]:
    """send `plan` (or, with `dry_run`, simulate it and send nothing); returns the report."""
    changes = [c.to_json_obj() for c in plan.changes]
    if not plan.steps:
        return {"ok": True, "changes": [], "note": plan.note}
    if dry_run:
        sender = chain.address or plan.default_sender
        calls = []
        for step in plan.steps:
            if step.needs_earlier:
                calls.append({"call": step.label, "simulation": "skipped (needs the steps before)"})
                continue
            returned = chain.simulate(step.build([]), sender)
            entry: dict[str, Any] = {"call": step.label, "simulation": "ok"}
            if returned not in (None, [], ()):
                entry["returns"] = _returned(returned)
            calls.append(entry)
        out: dict[str, Any] = {"dry_run": True, "sender": sender, "calls": calls}
        if chain.address is None and sender:
            out["sender"] = f"{sender} (the owner: no key given)"
        out["changes"] = changes
        if plan.note:
            out["note"] = plan.note
        return out
    receipts: list[Any] = []
    for step in plan.steps:
        receipts.append(chain.send(step.build(receipts)))
    if plan.verify is not None:
        plan.verify(receipts)
    out = {
        "ok": True,
        "transactions": [_hex(bytes(r["transactionHash"])) for r in receipts],
        "block": int(receipts[-1]["blockNumber"]),
        "changes": changes,
    }
    if plan.result is not None:
        out.update(plan.result(receipts))
    if plan.note:
        out["note"] = plan.note
    return out


def _no_arg_call(signature: str, abi: list[dict[str, Any]] | None) -> bytes:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*\(\)", signature):
        raise ChainInputError(
            f"--call {signature!r}: only a function without arguments, like initializeV2(); "
            "pass any other call as --call-data"
        )
    if abi is not None and not any(
        e.get("type") == "function" and f"{e['name']}()" == signature and not e["inputs"]
        for e in abi
    ):
        raise ChainInputError(f"--call {signature}: the new implementation has no such function")
    return keccak(text=signature)[:4]


class Operator:
    """the actions of `dstack-kms-chain` on one KMS (and its apps)."""

    def __init__(self, chain: Chain, kms: KmsContract) -> None:
        self.chain = chain
        self.kms = kms

    # -- targets ---------------------------------------------------------------------------

    def app(self, app_id: str) -> Any:
        """the DstackApp at `app_id` (checked: a contract declaring both app interfaces)."""
        address = parse_address(app_id, "app")
        self.chain.require_contract(address, "app", "app")
        return self.kms.app(address)

    def target(self, app_id: str | None) -> tuple[Any, str, AppKind]:
        """(contract, label, kind) of the app `app_id`, or of the KMS when None."""
        if app_id is None:
            return self.kms.c, f"kms {self.kms.address}", "kms"
        contract = self.app(app_id)
        return contract, f"app {contract.address}", "app"

    def owner(self, contract: Any) -> str:
        return str(self.chain.read(contract.functions.owner()))

    def _step(self, contract: Any, label: str, fn: str, *args: Any) -> Step:
        shown = ", ".join(_hex(a) if isinstance(a, bytes) else str(a) for a in args)
        call = getattr(contract.functions, fn)(*args)
        return Step(f"{label}: {fn}({shown})", lambda _: call)

    def _plan(self, contract: Any, step: Step, changes: list[Change], note: str = "") -> Plan:
        return Plan([step], changes, note=note, default_sender=self.owner(contract))

    # -- allowlists and flags --------------------------------------------------------------

    def set_listed(self, kind: str, value: str, enabled: bool, app_id: str | None = None) -> Plan:
        """add (`enabled`) or remove a hash of the allowlist `kind` (see LISTS)."""
        on_app, getter, add, remove, what = LISTS[kind]
        contract, label, _ = self.target(app_id if on_app else None)
        raw = parse_hash(value, what)
        current = bool(self.chain.read(getattr(contract.functions, getter)(raw)))
        if current == enabled:
            if enabled:
                return Plan([], note=f"{what} {_hex(raw)} is already allowed on {label}")
            raise ChainInputError(
                f"{what} {_hex(raw)} is not allowed on {label}: nothing to remove "
                "(check the value; `show` lists what is allowed)"
            )
        step = self._step(contract, label, add if enabled else remove, raw)
        return self._plan(contract, step, [Change(f"{what} {_hex(raw)}", current, enabled)])

    def set_flag(self, kind: str, app_id: str, value: bool) -> Plan:
        getter, setter = FLAGS[kind]
        contract, label, _ = self.target(app_id)
        current = bool(self.chain.read(getattr(contract.functions, getter)()))
        if current == value:
            return Plan([], note=f"{kind} is already {str(value).lower()} on {label}")
        step = self._step(contract, label, setter, value)
        return self._plan(contract, step, [Change(kind, current, value)])

    def set_gateway_app_id(self, value: str) -> Plan:
        contract, label, _ = self.target(None)
        current = str(self.chain.read(contract.functions.gatewayAppId()))
        if current == value:
            return Plan([], note=f"the gateway app id of {label} is already {value!r}")
        step = self._step(contract, label, "setGatewayAppId", value)
        return self._plan(contract, step, [Change("gateway app id", current, value)])

    def set_kms_info(self, path: Path) -> Plan:
        """setKmsInfo from a JSON file {k256Pubkey, caPubkey, quote, eventlog} (hex): the k256
        key must be a secp256k1 point (33 or 65 bytes), the ca key a DER SubjectPublicKeyInfo."""
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ChainInputError(f"cannot read kms info {path}: {e}") from e
        if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
            raise ChainInputError(f"{path}: expected an object of hex strings {KMS_INFO_KEYS}")
        unknown = sorted(set(doc) - set(KMS_INFO_KEYS))
        if unknown:
            raise ChainInputError(f"{path}: unknown keys {unknown} (expected {KMS_INFO_KEYS})")
        new = tuple(parse_hex(doc.get(k, ""), f"{path.name} {k}") for k in KMS_INFO_KEYS)
        try:
            coincurve.PublicKey(new[0])
        except ValueError:
            raise ChainInputError(f"{path}: k256Pubkey is not a secp256k1 public key") from None
        try:
            load_der_public_key(new[1])
        except ValueError:
            raise ChainInputError(
                f"{path}: caPubkey is not a DER SubjectPublicKeyInfo public key"
            ) from None
        contract, label, _ = self.target(None)
        current = tuple(bytes(v) for v in self.chain.read(contract.functions.kmsInfo()))
        changes = []
        for key, old, value in zip(KMS_INFO_KEYS, current, new, strict=True):
            if old != value:
                big = key in ("quote", "eventlog")
                show = (lambda b: f"{len(b)} bytes") if big else _hex
                changes.append(Change(key, show(old), show(value)))
        if not changes:
            return Plan([], note=f"the kms info of {label} is already that")
        return self._plan(contract, self._step(contract, label, "setKmsInfo", new), changes)

    def register_app(self, app_id: str) -> Plan:
        """registerApp for an app contract deployed elsewhere (it must declare IAppAuth)."""
        address = parse_address(app_id, "app")
        self.chain.require_contract(address, "app-auth", "app")
        contract, label, _ = self.target(None)
        if self.chain.read(contract.functions.registeredApps(address)):
            return Plan([], note=f"app {address} is already registered on {label}")
        step = self._step(contract, label, "registerApp", address)
        plan = Plan([step], [Change(f"registered app {address}", False, True)])
        plan.default_sender = self.owner(contract)
        return plan

    def create_app(
        self,
        *,
        owner: str | None,
        compose_hash: str,
        device: str,
        allow_any_device: bool,
        require_tcb_up_to_date: bool,
        disable_upgrades: bool,
    ) -> Plan:
        """deployAndRegisterApp (6 arguments); an empty hash or device means none."""
        contract, label, _ = self.target(None)
        sender = self.chain.address or self.owner(contract)
        app_owner = parse_address(owner, "owner") if owner else sender
        ch = parse_hash(compose_hash, "compose hash") if compose_hash else b""
        dev = parse_hash(device, "device") if device else b""
        if int(self.kms.app_implementation(), 16) == 0:
            raise ChainInputError(f"{label} has no app implementation: set-app-implementation")
        call = self.kms.create_app_call(
            app_owner,
            disable_upgrades=disable_upgrades,
            require_tcb_up_to_date=require_tcb_up_to_date,
            allow_any_device=allow_any_device,
            device_id=dev,
            compose_hash=ch,
        )
        settings = {
            "owner": app_owner,
            "compose_hash": _hex(ch) if ch else None,
            "device": _hex(dev) if dev else None,
            "allow_any_device": allow_any_device,
            "require_tcb_up_to_date": require_tcb_up_to_date,
            "upgrades_disabled": disable_upgrades,
        }
        return Plan(
            [Step(f"{label}: deployAndRegisterApp(...)", lambda _: call)],
            [Change("new app", None, settings)],
            default_sender=sender,
            result=lambda receipts: {"app_id": self.kms.created_app(receipts[0])},
        )

    # -- implementations and upgrades ------------------------------------------------------

    def _implementation_steps(
        self, kind: AppKind, implementation: str | None, artifact_path: Path | None
    ) -> tuple[list[Step], Callable[[list[Any]], str], str, dict[str, Any] | None]:
        """(deploy steps, the new address from the receipts, how to show it, its artifact)."""
        if (implementation is None) == (artifact_path is None):
            raise ChainInputError("give either --implementation ADDRESS or --artifact FILE")
        if implementation is not None:
            address = parse_address(implementation, "implementation")
            self.chain.require_implementation(address, kind, "implementation")
            return [], lambda _: address, address, None
        assert artifact_path is not None
        doc = load_artifact(artifact_path)
        names = {e.get("name") for e in doc["abi"] if e.get("type") == "function"}
        missing = {"proxiableUUID", "upgradeToAndCall", "supportsInterface"} - names
        if missing:
            raise ChainInputError(f"{artifact_path} is not a UUPS implementation: no {missing}")
        deploy_fn = self.chain.contract(doc).constructor()
        step = Step(f"deploy {artifact_path.name}", lambda _: deploy_fn)

        def deployed(receipts: list[Any]) -> str:
            address = to_checksum_address(receipts[0]["contractAddress"])
            self.chain.require_implementation(address, kind, f"{artifact_path.name} deployed at")
            return address

        return [step], deployed, f"(new, from {artifact_path.name})", doc

    def set_app_implementation(
        self, implementation: str | None = None, artifact_path: Path | None = None
    ) -> Plan:
        """setAppImplementation: the DstackApp implementation new apps are proxies of."""
        contract, label, _ = self.target(None)
        deploy, address_of, shown, doc = self._implementation_steps(
            "app", implementation, artifact_path
        )
        if doc is not None and not any(
            e.get("type") == "function"
            and f"{e['name']}({','.join(i['type'] for i in e['inputs'])})" == FACTORY_INITIALIZER
            for e in doc["abi"]
        ):
            raise ChainInputError(
                f"{artifact_path}: no {FACTORY_INITIALIZER}, which the factory calls"
            )
        current = self.kms.app_implementation()
        if not deploy and address_of([]) == current:
            return Plan([], note=f"{current} is already the app implementation of {label}")
        step = Step(
            f"{label}: setAppImplementation({shown})",
            lambda receipts: contract.functions.setAppImplementation(address_of(receipts)),
            needs_earlier=bool(deploy),
        )
        return Plan(
            [*deploy, step],
            [Change("app implementation", current, shown)],
            default_sender=self.owner(contract),
            result=lambda receipts: {"app_implementation": address_of(receipts)},
        )

    def upgrade(
        self,
        app_id: str | None,
        *,
        implementation: str | None = None,
        artifact_path: Path | None = None,
        call: str | None = None,
        call_data: str | None = None,
    ) -> Plan:
        """upgradeToAndCall on the KMS proxy (or the app's); refused before anything is sent
        when the sender is not the owner, the app's upgrades are disabled, the implementation
        is not a UUPS implementation of the same kind, or an artifact's storage layout does not
        extend the current one (`layout_problems`)."""
        contract, label, kind = self.target(app_id)
        owner = self.owner(contract)
        sender = self.chain.address
        if sender is not None and sender != owner:
            raise ChainInputError(f"the sender {sender} is not the owner {owner} of {label}")
        if kind == "app" and upgrades_disabled(self.chain, contract.address):
            raise ChainInputError(f"upgrades of {label} are permanently disabled")
        if call is not None and call_data is not None:
            raise ChainInputError("give --call or --call-data, not both")
        deploy, address_of, shown, doc = self._implementation_steps(
            kind, implementation, artifact_path
        )
        if doc is not None:
            layout = doc.get("storageLayout")
            if not isinstance(layout, list):
                raise ChainInputError(
                    f"{artifact_path} has no storageLayout: cannot check that the upgrade "
                    "keeps the state (build it with scripts/build-contracts.sh)"
                )
            base = "DstackApp" if kind == "app" else "DstackKms"
            problems = layout_problems(artifact(base)["storageLayout"], layout)
            if problems:
                raise ChainInputError(
                    f"{artifact_path} would corrupt the state of {label}: " + "; ".join(problems)
                )
        data = b""
        if call is not None:
            data = _no_arg_call(call, doc["abi"] if doc else None)
        elif call_data is not None:
            data = parse_hex(call_data, "--call-data")
        current = self.chain.implementation(contract.address)
        if not deploy and address_of([]) == current and not data:
            return Plan([], note=f"{current} is already the implementation of {label}")
        step = Step(
            f"{label}: upgradeToAndCall({shown}, {_hex(data)})",
            lambda receipts: contract.functions.upgradeToAndCall(address_of(receipts), data),
            needs_earlier=bool(deploy),
        )
        changes = [Change("implementation", current, shown)]
        if data:
            changes.append(Change("call after upgrade", None, call or _hex(data)))

        def verify(receipts: list[Any]) -> None:
            now = self.chain.implementation(contract.address)
            if now != address_of(receipts):
                raise ChainError(f"{label} still runs {now} after the upgrade")

        plan = Plan([*deploy, step], changes, default_sender=owner, verify=verify)
        plan.result = lambda receipts: {"implementation": address_of(receipts)}
        if doc is None:
            plan.note = "storage layout not checked (give --artifact to check it)"
        return plan

    def disable_upgrades(self, app_id: str) -> Plan:
        contract, label, _ = self.target(app_id)
        if upgrades_disabled(self.chain, contract.address):
            return Plan([], note=f"upgrades of {label} are already disabled")
        step = self._step(contract, label, "disableUpgrades")
        return self._plan(
            contract,
            step,
            [Change("upgrades disabled", False, True)],
            note="irreversible: the app's implementation can never change again",
        )

    # -- ownership -------------------------------------------------------------------------

    def transfer_ownership(self, app_id: str | None, new_owner: str) -> Plan:
        """the first step of a two-step transfer: `new_owner` becomes the pending owner."""
        contract, label, _ = self.target(app_id)
        new = parse_address(new_owner, "new owner")
        owner = self.owner(contract)
        pending = str(self.chain.read(contract.functions.pendingOwner()))
        if new == owner:
            raise ChainInputError(f"{new} already owns {label}")
        note = f"{new} becomes the owner when it runs accept-ownership"
        if new == pending:
            return Plan([], note=f"{new} is already the pending owner of {label}; {note}")
        step = self._step(contract, label, "transferOwnership", new)
        pending_shown = None if int(pending, 16) == 0 else pending
        return self._plan(contract, step, [Change("pending owner", pending_shown, new)], note)

    def accept_ownership(self, app_id: str | None) -> Plan:
        contract, label, _ = self.target(app_id)
        sender = self.chain.require_sender()
        pending = str(self.chain.read(contract.functions.pendingOwner()))
        if int(pending, 16) == 0:
            raise ChainInputError(f"{label} has no ownership transfer pending")
        if pending != sender:
            raise ChainInputError(
                f"the sender {sender} is not the pending owner {pending} of {label}"
            )
        owner = self.owner(contract)
        return Plan(
            [self._step(contract, label, "acceptOwnership")],
            [Change("owner", owner, sender), Change("pending owner", pending, None)],
            default_sender=sender,
        )


def deploy_plan(chain: Chain, owner: str | None) -> Plan:
    """a DstackApp implementation, a DstackKms implementation and the KMS proxy owned by
    `owner` (default: the sender) with that app implementation."""
    sender = chain.require_sender()
    kms_owner = parse_address(owner, "owner") if owner else sender
    app_impl = chain.contract("DstackApp").constructor()
    kms_impl = chain.contract("DstackKms").constructor()

    def proxy(receipts: list[Any]) -> Any:
        app, kms = (str(r["contractAddress"]) for r in receipts[:2])
        init = chain.contract("DstackKms").encode_abi("initialize", [kms_owner, app])
        return chain.contract("ERC1967Proxy").constructor(kms, init)

    return Plan(
        [
            Step("deploy DstackApp implementation", lambda _: app_impl),
            Step("deploy DstackKms implementation", lambda _: kms_impl),
            Step("deploy ERC1967Proxy(DstackKms, initialize(owner, app))", proxy, True),
        ],
        [Change("new kms", None, {"owner": kms_owner})],
        default_sender=sender,
        result=lambda receipts: {
            "kms": str(receipts[2]["contractAddress"]),
            "kms_implementation": str(receipts[1]["contractAddress"]),
            "app_implementation": str(receipts[0]["contractAddress"]),
        },
    )
