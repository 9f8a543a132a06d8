"""the contracts' interface is upstream's, exactly: every function, event and error with its
parameter names and types (named-argument tools and decoded logs see names), the selectors and
topics, the storage layout an upgrade from an upstream deployment relies on, the ERC-165 ids, and
which events each call emits in which order (an indexer rebuilds policy from them).

The tables are facts read from upstream's contracts (Dstack-TEE/dstack
dstack/kms/auth-eth/contracts at 312dc605, OpenZeppelin 5.4.0): upstream's code is not used here.
"""

from __future__ import annotations

from typing import Any

import pytest
from eth_account import Account
from eth_utils.crypto import keccak
from web3.logs import DISCARD

from pydstack.kms.anvil import DEV_PRIVATE_KEY, Anvil
from pydstack.kms.chain import Chain
from pydstack.kms.chain_abi import IAPP_AUTH, IAPP_AUTH_BASIC_MANAGEMENT, artifact

#: upstream's DstackKms ABI: entry (names, types, mutability) -> selector or event topic
UPSTREAM_KMS_ABI = {
    "constructor() nonpayable": "",
    "error AddressEmptyCode(address target)": "9996b315",
    "error ERC1967InvalidImplementation(address implementation)": "4c9c8ce3",
    "error ERC1967NonPayable()": "b398979f",
    "error FailedCall()": "d6bda275",
    "error InvalidInitialization()": "f92ee8a9",
    "error NotInitializing()": "d7e6bcf8",
    "error OwnableInvalidOwner(address owner)": "1e4fbdf7",
    "error OwnableUnauthorizedAccount(address account)": "118cdaa7",
    "error UUPSUnauthorizedCallContext()": "e07c8dba",
    "error UUPSUnsupportedProxiableUUID(bytes32 slot)": "aa1d49a4",
    "event AppDeployedViaFactory(address indexed appId,address indexed deployer)": "fd86d7f6962eba3b7a3bf9129c06c0b2f885e1c61ef2c9f0dbb856be0deefdee",
    "event AppImplementationSet(address implementation)": "08bb433f12b5fd81d2d5e0deeb3b4d28371781ddbd80e9d053e7468d2b1aa82d",
    "event AppRegistered(address appId)": "0d540ad8f39e07d19909687352b9fa017405d93c91a6760981fbae9cf28bfef7",
    "event GatewayAppIdSet(string gatewayAppId)": "5b2b64f770ea5266055ebd3ebf205ef06cbfa738e62684edf0e28356e34acf06",
    "event Initialized(uint64 version)": "c7f505b2f371ae2175ee4913f4499e1f2633a7b5936321eed1cdaeb6115181d2",
    "event KmsAggregatedMrAdded(bytes32 mrAggregated)": "68615a0b92795750b3d180ff73429e1291d225e449eee954a567b91104fd9837",
    "event KmsAggregatedMrRemoved(bytes32 mrAggregated)": "54cd662e41eec7ddf0f32f034b2533e481b471dd3ea978222d609ec8fffb1bb0",
    "event KmsDeviceAdded(bytes32 deviceId)": "f2b290637b1193e12eb38ab32b986303639b1687cc2cd1e25f993e6eae2f4041",
    "event KmsDeviceRemoved(bytes32 deviceId)": "1a9888a45e3df8b7e6bb3090747d598d2a0d78e61388161a90799f54df8f4434",
    "event KmsInfoSet(bytes k256Pubkey)": "77cdad119a452bbd96c45635758fc4af8a6bde3deaccf3fada634ddf9a162706",
    "event OsImageHashAdded(bytes32 osImageHash)": "4911843506849c85a5ca6e6e2c01eed2d3ab86baba619517a2aad9d5ab2aeff2",
    "event OsImageHashRemoved(bytes32 osImageHash)": "99b3cee95daf3138d0c982299cd0264f5b7a61aa629b42b92f3ec8966aa7f6fe",
    "event OwnershipTransferStarted(address indexed previousOwner,address indexed newOwner)": "38d16b8cac22d99fc7c124b9cd0de2d3fa1faef420bfe791d8c362d765e22700",
    "event OwnershipTransferred(address indexed previousOwner,address indexed newOwner)": "8be0079c531659141344cd1fd0a4f28419497f9722a3daafe3b4186f6b6457e0",
    "event PolicyChanged(address indexed actor,bytes32 indexed policy,bytes32 indexed value,bool enabled)": "341d3bc64e32172fc5bcf27b0f7f69dc5adc19af64b7aa1dee361e5883c32375",
    "event Upgraded(address indexed implementation)": "bc7cd75a20ee27fd9adebab32041f755214dbc6bffa90cc0225b39da2e5c2d3b",
    "function UPGRADE_INTERFACE_VERSION() view returns (string)": "ad3cb1cc",
    "function acceptOwnership() nonpayable": "79ba5097",
    "function addKmsAggregatedMr(bytes32 mrAggregated) nonpayable": "3e32d346",
    "function addKmsDevice(bytes32 deviceId) nonpayable": "4d5922a1",
    "function addOsImageHash(bytes32 osImageHash) nonpayable": "06a3ae96",
    "function allowedOsImages(bytes32) view returns (bool)": "9a4e1d18",
    "function appImplementation() view returns (address)": "25a992da",
    "function deployAndRegisterApp(address initialOwner,bool disableUpgrades,bool allowAnyDevice,bytes32 initialDeviceId,bytes32 initialComposeHash) nonpayable returns (address appId)": "8618169d",
    "function deployAndRegisterApp(address initialOwner,bool disableUpgrades,bool requireTcbUpToDate,bool allowAnyDevice,bytes32 initialDeviceId,bytes32 initialComposeHash) nonpayable returns (address appId)": "9cb9c31f",
    "function gatewayAppId() view returns (string)": "95f51931",
    "function initialize(address initialOwner,address _appImplementation) nonpayable": "485cc955",
    "function isAppAllowed((address appId,bytes32 composeHash,address instanceId,bytes32 deviceId,bytes32 mrAggregated,bytes32 mrSystem,bytes32 osImageHash,string tcbStatus,string[] advisoryIds) bootInfo) view returns (bool isAllowed,string reason)": "1e079198",
    "function isKmsAllowed((address appId,bytes32 composeHash,address instanceId,bytes32 deviceId,bytes32 mrAggregated,bytes32 mrSystem,bytes32 osImageHash,string tcbStatus,string[] advisoryIds) bootInfo) view returns (bool isAllowed,string reason)": "e067ec9d",
    "function kmsAllowedAggregatedMrs(bytes32) view returns (bool)": "f6fe4f40",
    "function kmsAllowedDeviceIds(bytes32) view returns (bool)": "13eb9770",
    "function kmsInfo() view returns (bytes k256Pubkey,bytes caPubkey,bytes quote,bytes eventlog)": "09177063",
    "function owner() view returns (address)": "8da5cb5b",
    "function pendingOwner() view returns (address)": "e30c3978",
    "function proxiableUUID() view returns (bytes32)": "52d1902d",
    "function registerApp(address appId) nonpayable": "17a1d80f",
    "function registeredApps(address) view returns (bool)": "a6c4cce9",
    "function removeKmsAggregatedMr(bytes32 mrAggregated) nonpayable": "2adee48d",
    "function removeKmsDevice(bytes32 deviceId) nonpayable": "9e6f3114",
    "function removeOsImageHash(bytes32 osImageHash) nonpayable": "9425bac6",
    "function renounceOwnership() nonpayable": "715018a6",
    "function setAppImplementation(address _implementation) nonpayable": "3ceaaa11",
    "function setGatewayAppId(string appId) nonpayable": "3971db27",
    "function setKmsEventlog(bytes eventlog) nonpayable": "736ede7a",
    "function setKmsInfo((bytes k256Pubkey,bytes caPubkey,bytes quote,bytes eventlog) info) nonpayable": "7d025352",
    "function setKmsQuote(bytes quote) nonpayable": "18c1ecb2",
    "function supportsInterface(bytes4 interfaceId) view returns (bool)": "01ffc9a7",
    "function transferOwnership(address newOwner) nonpayable": "f2fde38b",
    "function upgradeToAndCall(address newImplementation,bytes data) payable": "4f1ef286",
}
#: upstream's DstackApp ABI, likewise
UPSTREAM_APP_ABI = {
    "constructor() nonpayable": "",
    "error AddressEmptyCode(address target)": "9996b315",
    "error ERC1967InvalidImplementation(address implementation)": "4c9c8ce3",
    "error ERC1967NonPayable()": "b398979f",
    "error FailedCall()": "d6bda275",
    "error InvalidInitialization()": "f92ee8a9",
    "error NotInitializing()": "d7e6bcf8",
    "error OwnableInvalidOwner(address owner)": "1e4fbdf7",
    "error OwnableUnauthorizedAccount(address account)": "118cdaa7",
    "error UUPSUnauthorizedCallContext()": "e07c8dba",
    "error UUPSUnsupportedProxiableUUID(bytes32 slot)": "aa1d49a4",
    "event AllowAnyDeviceSet(bool allowAny)": "bb2cdb6c7b362202d40373f87bc4788301cca658f91711ac1662e1ad2cba4a20",
    "event ComposeHashAdded(bytes32 composeHash)": "fecb34306dd9d8b785b54d65489d06afc8822a0893ddacedff40c50a4942d0af",
    "event ComposeHashRemoved(bytes32 composeHash)": "755b79bd4b0eeab344d032284a99003b2ddc018b646752ac72d681593a6e8947",
    "event DeviceAdded(bytes32 deviceId)": "67fc71ab96fe3fa3c6f78e9a00e635d591b7333ce611c0380bc577aac702243b",
    "event DeviceRemoved(bytes32 deviceId)": "e0862975ac517b0478d308012afabc4bc37c23874a18144d7f2dfb852ff95c2c",
    "event Initialized(uint64 version)": "c7f505b2f371ae2175ee4913f4499e1f2633a7b5936321eed1cdaeb6115181d2",
    "event OwnershipTransferStarted(address indexed previousOwner,address indexed newOwner)": "38d16b8cac22d99fc7c124b9cd0de2d3fa1faef420bfe791d8c362d765e22700",
    "event OwnershipTransferred(address indexed previousOwner,address indexed newOwner)": "8be0079c531659141344cd1fd0a4f28419497f9722a3daafe3b4186f6b6457e0",
    "event PolicyChanged(address indexed actor,bytes32 indexed policy,bytes32 indexed value,bool enabled)": "341d3bc64e32172fc5bcf27b0f7f69dc5adc19af64b7aa1dee361e5883c32375",
    "event RequireTcbUpToDateSet(bool requireUpToDate)": "afae60561b2481a349b45b3a47357f70eef6ae67e5b6e1749d74de7f19a25aa1",
    "event Upgraded(address indexed implementation)": "bc7cd75a20ee27fd9adebab32041f755214dbc6bffa90cc0225b39da2e5c2d3b",
    "event UpgradesDisabled()": "0e5daa943fcd7e7182d0e893d180695c2ea9f6f1b4a1c5432faf14cf17b774e8",
    "function UPGRADE_INTERFACE_VERSION() view returns (string)": "ad3cb1cc",
    "function acceptOwnership() nonpayable": "79ba5097",
    "function addComposeHash(bytes32 composeHash) nonpayable": "dfc77223",
    "function addDevice(bytes32 deviceId) nonpayable": "2a819728",
    "function allowAnyDevice() view returns (bool)": "3440a16a",
    "function allowedComposeHashes(bytes32) view returns (bool)": "2f6622e5",
    "function allowedDeviceIds(bytes32) view returns (bool)": "bf8b211b",
    "function disableUpgrades() nonpayable": "ec669036",
    "function initialize(address initialOwner,bool _disableUpgrades,bool _allowAnyDevice,bytes32 initialDeviceId,bytes32 initialComposeHash) nonpayable": "187515ca",
    "function initialize(address initialOwner,bool _disableUpgrades,bool _requireTcbUpToDate,bool _allowAnyDevice,bytes32 initialDeviceId,bytes32 initialComposeHash) nonpayable": "9ed28193",
    "function isAppAllowed((address appId,bytes32 composeHash,address instanceId,bytes32 deviceId,bytes32 mrAggregated,bytes32 mrSystem,bytes32 osImageHash,string tcbStatus,string[] advisoryIds) bootInfo) view returns (bool isAllowed,string reason)": "1e079198",
    "function owner() view returns (address)": "8da5cb5b",
    "function pendingOwner() view returns (address)": "e30c3978",
    "function proxiableUUID() view returns (bytes32)": "52d1902d",
    "function removeComposeHash(bytes32 composeHash) nonpayable": "67b3f22c",
    "function removeDevice(bytes32 deviceId) nonpayable": "1d266200",
    "function renounceOwnership() nonpayable": "715018a6",
    "function requireTcbUpToDate() view returns (bool)": "0aa58c83",
    "function setAllowAnyDevice(bool _allowAnyDevice) nonpayable": "7c4beeb8",
    "function setRequireTcbUpToDate(bool _requireUpToDate) nonpayable": "6e4c7422",
    "function supportsInterface(bytes4 interfaceId) view returns (bool)": "01ffc9a7",
    "function transferOwnership(address newOwner) nonpayable": "f2fde38b",
    "function upgradeToAndCall(address newImplementation,bytes data) payable": "4f1ef286",
    "function version() pure returns (uint256)": "54fd4d50",
}

#: storage as (label, slot, offset, type): what upstream's proxies hold where
UPSTREAM_KMS_STORAGE = [
    ("kmsInfo", 0, 0, "struct DstackKms.KmsInfo"),
    ("gatewayAppId", 4, 0, "string"),
    ("registeredApps", 5, 0, "mapping(address => bool)"),
    ("kmsAllowedAggregatedMrs", 6, 0, "mapping(bytes32 => bool)"),
    ("kmsAllowedDeviceIds", 7, 0, "mapping(bytes32 => bool)"),
    ("allowedOsImages", 8, 0, "mapping(bytes32 => bool)"),
    ("appImplementation", 9, 0, "address"),
    ("__gap", 10, 0, "uint256[50]"),
]
UPSTREAM_APP_STORAGE = [
    ("allowedComposeHashes", 0, 0, "mapping(bytes32 => bool)"),
    ("_upgradesDisabled", 1, 0, "bool"),
    ("allowAnyDevice", 1, 1, "bool"),
    ("allowedDeviceIds", 2, 0, "mapping(bytes32 => bool)"),
    ("requireTcbUpToDate", 3, 0, "bool"),
    ("__gap", 4, 0, "uint256[49]"),
]
#: ERC-165 ids upstream's supportsInterface answers true for (besides ERC-165's 01ffc9a7)
UPSTREAM_INTERFACES = {"DstackKms": {"1e079198"}, "DstackApp": {"1e079198", "8fd37527"}}

ZERO = "0x" + "00" * 20
K256 = bytes.fromhex("02" + "11" * 32)
CA = b"ca-spki"
H1, H2, H3, H4, H5, H6, H7 = (bytes([i]) * 32 for i in range(1, 8))


def policy(actor: str, name: str, value: Any, enabled: bool) -> tuple[str, str, dict[str, Any]]:
    return ("PolicyChanged", name, {"actor": actor, "value": value, "enabled": enabled})


#: which events each call emits, in order, from which contract, with which arguments. A step is
#: (sender, target, call, arguments, expected logs, name bound to the AppDeployedViaFactory app);
#: "$x" names an account or contract of the scenario, PolicyChanged is written with its policy
#: name (the topic is its keccak) and a value that is the argument itself or an address padded
#: into bytes32.
EMITS: list[tuple[str, str, str, list[Any], list[tuple[str, Any, ...]], str | None]] = [
    (
        "$owner",
        "",
        "deploy ERC1967Proxy(kms_impl, initialize(owner, app_impl))",
        [],
        [
            ("$kms", "Upgraded", {"implementation": "$kms_impl"}),
            ("$kms", "OwnershipTransferred", {"previousOwner": ZERO, "newOwner": "$owner"}),
            ("$kms", "AppImplementationSet", {"implementation": "$app_impl"}),
            ("$kms", *policy("$owner", "app-implementation", "$app_impl", True)),
            ("$kms", "Initialized", {"version": 1}),
        ],
        None,
    ),
    (
        "$owner",
        "$kms",
        "setKmsInfo((bytes,bytes,bytes,bytes))",
        [(K256, CA, b"q", b"e")],
        [
            ("$kms", "KmsInfoSet", {"k256Pubkey": K256}),
            ("$kms", *policy("$owner", "kms-info", keccak(K256), True)),
        ],
        None,
    ),
    ("$owner", "$kms", "setKmsQuote(bytes)", [b"quote"], [], None),
    ("$owner", "$kms", "setKmsEventlog(bytes)", [b"log"], [], None),
    (
        "$owner",
        "$kms",
        "setGatewayAppId(string)",
        ["gw"],
        [
            ("$kms", "GatewayAppIdSet", {"gatewayAppId": "gw"}),
            ("$kms", *policy("$owner", "gateway-app-id", keccak(b"gw"), True)),
        ],
        None,
    ),
    (
        "$owner",
        "$kms",
        "addKmsAggregatedMr(bytes32)",
        [H1],
        [
            ("$kms", "KmsAggregatedMrAdded", {"mrAggregated": H1}),
            ("$kms", *policy("$owner", "kms-aggregated-mr", H1, True)),
        ],
        None,
    ),
    (
        "$owner",
        "$kms",
        "removeKmsAggregatedMr(bytes32)",
        [H1],
        [
            ("$kms", "KmsAggregatedMrRemoved", {"mrAggregated": H1}),
            ("$kms", *policy("$owner", "kms-aggregated-mr", H1, False)),
        ],
        None,
    ),
    (
        "$owner",
        "$kms",
        "addKmsDevice(bytes32)",
        [H2],
        [
            ("$kms", "KmsDeviceAdded", {"deviceId": H2}),
            ("$kms", *policy("$owner", "kms-device", H2, True)),
        ],
        None,
    ),
    (
        "$owner",
        "$kms",
        "removeKmsDevice(bytes32)",
        [H2],
        [
            ("$kms", "KmsDeviceRemoved", {"deviceId": H2}),
            ("$kms", *policy("$owner", "kms-device", H2, False)),
        ],
        None,
    ),
    (
        "$owner",
        "$kms",
        "addOsImageHash(bytes32)",
        [H3],
        [
            ("$kms", "OsImageHashAdded", {"osImageHash": H3}),
            ("$kms", *policy("$owner", "os-image", H3, True)),
        ],
        None,
    ),
    (
        "$owner",
        "$kms",
        "removeOsImageHash(bytes32)",
        [H3],
        [
            ("$kms", "OsImageHashRemoved", {"osImageHash": H3}),
            ("$kms", *policy("$owner", "os-image", H3, False)),
        ],
        None,
    ),
    (
        "$other",
        "$kms",
        "registerApp(address)",
        ["$other"],
        [
            ("$kms", "AppRegistered", {"appId": "$other"}),
            ("$kms", *policy("$other", "registered-app", "$other", True)),
        ],
        None,
    ),
    (
        "$owner",
        "$kms",
        "setAppImplementation(address)",
        ["$app_impl2"],
        [
            ("$kms", "AppImplementationSet", {"implementation": "$app_impl2"}),
            ("$kms", *policy("$owner", "app-implementation", "$app_impl2", True)),
        ],
        None,
    ),
    (
        "$other",
        "$kms",
        "deployAndRegisterApp(address,bool,bool,bool,bytes32,bytes32)",
        ["$owner", False, True, False, H4, H5],
        [
            ("$app", "Upgraded", {"implementation": "$app_impl2"}),
            ("$app", "DeviceAdded", {"deviceId": H4}),
            ("$app", *policy("$kms", "device", H4, True)),
            ("$app", "ComposeHashAdded", {"composeHash": H5}),
            ("$app", *policy("$kms", "compose-hash", H5, True)),
            ("$app", "OwnershipTransferred", {"previousOwner": ZERO, "newOwner": "$owner"}),
            ("$app", "Initialized", {"version": 1}),
            ("$kms", "AppRegistered", {"appId": "$app"}),
            ("$kms", *policy("$other", "registered-app", "$app", True)),
            ("$kms", "AppDeployedViaFactory", {"appId": "$app", "deployer": "$other"}),
        ],
        "app",
    ),
    (
        "$owner",
        "$kms",
        "deployAndRegisterApp(address,bool,bool,bytes32,bytes32)",
        ["$other", True, True, bytes(32), bytes(32)],
        [
            ("$app5", "Upgraded", {"implementation": "$app_impl2"}),
            ("$app5", "OwnershipTransferred", {"previousOwner": ZERO, "newOwner": "$other"}),
            ("$app5", "Initialized", {"version": 1}),
            ("$kms", "AppRegistered", {"appId": "$app5"}),
            ("$kms", *policy("$owner", "registered-app", "$app5", True)),
            ("$kms", "AppDeployedViaFactory", {"appId": "$app5", "deployer": "$owner"}),
        ],
        "app5",
    ),
    (
        "$owner",
        "$app",
        "addComposeHash(bytes32)",
        [H6],
        [
            ("$app", "ComposeHashAdded", {"composeHash": H6}),
            ("$app", *policy("$owner", "compose-hash", H6, True)),
        ],
        None,
    ),
    (
        "$owner",
        "$app",
        "removeComposeHash(bytes32)",
        [H6],
        [
            ("$app", "ComposeHashRemoved", {"composeHash": H6}),
            ("$app", *policy("$owner", "compose-hash", H6, False)),
        ],
        None,
    ),
    (
        "$owner",
        "$app",
        "addDevice(bytes32)",
        [H7],
        [
            ("$app", "DeviceAdded", {"deviceId": H7}),
            ("$app", *policy("$owner", "device", H7, True)),
        ],
        None,
    ),
    (
        "$owner",
        "$app",
        "removeDevice(bytes32)",
        [H7],
        [
            ("$app", "DeviceRemoved", {"deviceId": H7}),
            ("$app", *policy("$owner", "device", H7, False)),
        ],
        None,
    ),
    (
        "$owner",
        "$app",
        "setAllowAnyDevice(bool)",
        [True],
        [
            ("$app", "AllowAnyDeviceSet", {"allowAny": True}),
            ("$app", *policy("$owner", "allow-any-device", bytes(32), True)),
        ],
        None,
    ),
    (
        "$owner",
        "$app",
        "setRequireTcbUpToDate(bool)",
        [False],
        [
            ("$app", "RequireTcbUpToDateSet", {"requireUpToDate": False}),
            ("$app", *policy("$owner", "require-tcb-up-to-date", bytes(32), False)),
        ],
        None,
    ),
    (
        "$owner",
        "$app",
        "upgradeToAndCall(address,bytes)",
        ["$app_v3", "$initialize_v2"],
        [
            ("$app", *policy("$owner", "implementation-upgrade", "$app_v3", True)),
            ("$app", "Upgraded", {"implementation": "$app_v3"}),
            ("$app", "Initialized", {"version": 2}),
        ],
        None,
    ),
    (
        "$owner",
        "$app",
        "disableUpgrades()",
        [],
        [
            ("$app", "UpgradesDisabled", {}),
            ("$app", *policy("$owner", "upgrades-disabled", bytes(32), True)),
        ],
        None,
    ),
    (
        "$owner",
        "$kms",
        "upgradeToAndCall(address,bytes)",
        ["$kms_v2", b""],
        [
            ("$kms", *policy("$owner", "implementation-upgrade", "$kms_v2", True)),
            ("$kms", "Upgraded", {"implementation": "$kms_v2"}),
        ],
        None,
    ),
    (
        "$owner",
        "$app",
        "transferOwnership(address)",
        ["$other"],
        [("$app", "OwnershipTransferStarted", {"previousOwner": "$owner", "newOwner": "$other"})],
        None,
    ),
    (
        "$other",
        "$app",
        "acceptOwnership()",
        [],
        [("$app", "OwnershipTransferred", {"previousOwner": "$owner", "newOwner": "$other"})],
        None,
    ),
    (
        "$other",
        "$app",
        "renounceOwnership()",
        [],
        [("$app", "OwnershipTransferred", {"previousOwner": "$other", "newOwner": ZERO})],
        None,
    ),
]


def _param(p: dict[str, Any], *, named: bool = True) -> str:
    t = p["type"]
    if t.startswith("tuple"):
        t = "(" + ",".join(_param(c, named=named) for c in p["components"]) + ")" + t[5:]
    if not named:
        return t
    t += " indexed" if p.get("indexed") else ""
    return t + (" " + p["name"] if p.get("name") else "")


def abi_table(abi: list[dict[str, Any]]) -> dict[str, str]:
    """a compiled abi in the notation of the upstream tables above."""
    out = {}
    for e in abi:
        ins = ",".join(_param(p) for p in e.get("inputs", []))
        if e["type"] == "constructor":
            out[f"constructor({ins}) {e['stateMutability']}"] = ""
            continue
        entry = f"{e['type']} {e['name']}({ins})"
        digest = keccak(
            text=f"{e['name']}({','.join(_param(p, named=False) for p in e.get('inputs', []))})"
        )
        if e["type"] == "function":
            outs = ",".join(_param(p) for p in e["outputs"])
            entry += f" {e['stateMutability']}" + (f" returns ({outs})" if outs else "")
        out[entry] = digest.hex() if e["type"] == "event" else digest[:4].hex()
    return out


@pytest.mark.parametrize(
    ("name", "upstream"), [("DstackKms", UPSTREAM_KMS_ABI), ("DstackApp", UPSTREAM_APP_ABI)]
)
def test_abi_is_upstreams(name, upstream):
    ours = abi_table(artifact(name)["abi"])
    assert {k: v for k, v in ours.items() if k not in upstream} == {}, "not in upstream's abi"
    assert {k: v for k, v in upstream.items() if k not in ours} == {}, "missing from ours"
    assert ours == upstream


@pytest.mark.parametrize(
    ("name", "upstream"), [("DstackKms", UPSTREAM_KMS_STORAGE), ("DstackApp", UPSTREAM_APP_STORAGE)]
)
def test_storage_layout_is_upstreams(name, upstream):
    layout = artifact(name)["storageLayout"]
    assert [(v["label"], int(v["slot"]), v["offset"], v["type"]) for v in layout] == upstream


def test_interface_ids_follow_from_the_selectors():
    """IAppAuth is isAppAllowed's selector, IAppAuthBasicManagement the xor of its four."""
    app = UPSTREAM_APP_ABI
    assert IAPP_AUTH.hex() == next(v for k, v in app.items() if " isAppAllowed(" in k)
    xor = 0
    for fn in ("addComposeHash", "removeComposeHash", "addDevice", "removeDevice"):
        xor ^= int(next(v for k, v in app.items() if f" {fn}(" in k), 16)
    assert IAPP_AUTH_BASIC_MANAGEMENT.hex() == f"{xor:08x}"


@pytest.fixture(scope="module")
def node():
    with Anvil() as n:
        yield n


def _resolve(value: Any, ctx: dict[str, Any]) -> Any:
    if isinstance(value, str) and value.startswith("$"):
        return ctx[value[1:]]
    if isinstance(value, tuple):
        return tuple(_resolve(v, ctx) for v in value)
    return value


def _bytes32(value: Any) -> bytes:
    if isinstance(value, str):  # an address
        return bytes(12) + bytes.fromhex(value[2:])
    return value


def _decode_logs(chain: Chain, receipt: Any, names: dict[str, str]) -> list[tuple[str, str, dict]]:
    by_topic = {}
    for art in ("DstackKms", "DstackApp"):
        for e in artifact(art)["abi"]:
            if e["type"] == "event":
                by_topic[
                    keccak(
                        text=f"{e['name']}({','.join(_param(p, named=False) for p in e['inputs'])})"
                    )
                ] = (art, e["name"])
    out = []
    for log in receipt["logs"]:
        art, event = by_topic[bytes(log["topics"][0])]
        args = dict(chain.contract(art, log["address"]).events[event]().process_log(log)["args"])
        out.append((names.get(log["address"], log["address"]), event, args))
    return out


def run_emission_table(chain: Chain, other: Chain) -> None:
    """walk EMITS on fresh contracts; assert each call's logs, in order, with their arguments."""
    owner = chain.address
    ctx: dict[str, Any] = {"owner": owner, "other": other.address}
    ctx["app_impl"] = chain.deploy("DstackApp")
    ctx["app_impl2"] = chain.deploy("DstackApp")
    ctx["kms_impl"] = chain.deploy("DstackKms")
    ctx["kms_v2"] = chain.deploy("DstackKmsV2")
    ctx["app_v3"] = chain.deploy("DstackAppV3")
    ctx["initialize_v2"] = keccak(text="initializeV2()")[:4]
    senders = {"$owner": chain, "$other": other}
    for sender, target, call, args, expected, binds in EMITS:
        by = senders[sender]
        if not target:
            init = chain.contract("DstackKms").encode_abi("initialize", [owner, ctx["app_impl"]])
            receipt = by.send(chain.contract("ERC1967Proxy").constructor(ctx["kms_impl"], init))
            ctx["kms"] = receipt["contractAddress"]
        else:
            address = _resolve(target, ctx)
            name = "DstackKms" if target == "$kms" else "DstackApp"
            fn = by.contract(name, address).get_function_by_signature(call)
            receipt = by.send(fn(*(_resolve(a, ctx) for a in args)))
        if binds:
            ctx[binds] = next(
                e.args["appId"]
                for e in chain.contract("DstackKms", ctx["kms"])
                .events.AppDeployedViaFactory()
                .process_receipt(receipt, errors=DISCARD)
            )
        names = {ctx[k]: f"${k}" for k in ("kms", "app", "app5") if k in ctx}
        logs = _decode_logs(chain, receipt, names)
        want = []
        for emitter, event, *rest in expected:
            if event == "PolicyChanged":
                pname, wargs = rest
                wargs = {
                    "actor": _resolve(wargs["actor"], ctx),
                    "policy": keccak(text=pname),
                    "value": _bytes32(_resolve(wargs["value"], ctx)),
                    "enabled": wargs["enabled"],
                }
            else:
                wargs = {k: _resolve(v, ctx) for k, v in rest[0].items()}
            want.append((emitter, event, wargs))
        assert [(e, n) for e, n, _ in logs] == [(e, n) for e, n, _ in want], call
        for (_, event, got), (_, _, wanted) in zip(logs, want, strict=True):
            assert got == wanted, f"{call}: {event}"


def test_each_call_emits_upstreams_events(node):
    chain = Chain.connect(node.url, node.chain_id, DEV_PRIVATE_KEY)
    other_key = Account.create()
    chain.w3.eth.send_transaction(
        {"from": chain.w3.eth.accounts[0], "to": other_key.address, "value": 10**18}
    )
    other = Chain.connect(node.url, node.chain_id, other_key.key.hex())
    run_emission_table(chain, other)


def test_supports_upstreams_interfaces(node):
    chain = Chain.connect(node.url, node.chain_id, DEV_PRIVATE_KEY)
    for name, ids in UPSTREAM_INTERFACES.items():
        impl = chain.deploy(name)
        for iid in ("1e079198", "8fd37527"):
            assert chain.supports_interface(impl, bytes.fromhex(iid)) == (iid in ids), (name, iid)
