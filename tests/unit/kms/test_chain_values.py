"""operator values are parsed strictly, reverts decode by name, storage layouts are compared,
and node urls are shown without their secrets: the pure parts of the chain modules."""

from __future__ import annotations

import pytest
from eth_abi.abi import encode
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak

from pydstack.kms.chain import public_url
from pydstack.kms.chain_abi import (
    ChainInputError,
    artifact,
    decode_revert,
    layout_problems,
    parse_address,
    parse_hash,
    parse_hex,
)

ADDRESS = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"  # EIP-55's own example


def test_addresses_keep_their_checksum():
    assert parse_address(ADDRESS) == ADDRESS
    assert parse_address(ADDRESS.lower()) == ADDRESS  # unchecksummed forms are accepted
    assert parse_address("0x" + ADDRESS[2:].upper()) == ADDRESS
    typo = ADDRESS[:-2] + "ad"  # a mistyped character ("e" -> "a"), the case as copied
    assert to_checksum_address(typo) != typo
    for bad, message in (
        (typo, "wrong EIP-55 checksum"),
        ("0x" + ADDRESS[2:].swapcase(), "wrong EIP-55 checksum"),
        (ADDRESS[:-1], "is not an address"),
        (ADDRESS[2:], "is not an address"),
        ("0x" + "00" * 20, "is the zero address"),
    ):
        with pytest.raises(ChainInputError, match=message):
            parse_address(bad, "app")


def test_hashes_are_exactly_32_bytes_and_never_padded():
    assert parse_hash("0x" + "ab" * 32) == b"\xab" * 32
    assert parse_hash("AB" * 32) == b"\xab" * 32
    for bad, message in (
        ("ab" * 31, "must be 32 bytes .64 hex digits., got 62 hex digits"),
        ("ab" * 33, "got 66 hex digits"),
        ("a" * 63, "got 63 hex digits"),
        ("", "is empty"),
        ("0x", "is empty"),
        ("zz" * 32, "is not hex"),
        ("00" * 32, "is all zeros"),
    ):
        with pytest.raises(ChainInputError, match=message):
            parse_hash(bad, "compose hash")
    assert parse_hex("", "quote") == b""
    with pytest.raises(ChainInputError, match="quote is not hex"):
        parse_hex("abc", "quote")


def test_reverts_decode_by_name():
    account = "0x" + "11" * 20
    sel = keccak(text="OwnableUnauthorizedAccount(address)")[:4]
    name, text = decode_revert(sel + encode(["address"], [account]))
    assert name == "OwnableUnauthorizedAccount"
    assert text == (
        "OwnableUnauthorizedAccount(account=0x1111111111111111111111111111111111111111): "
        "the sender is not the owner"
    )
    sel = keccak(text="UUPSUnsupportedProxiableUUID(bytes32)")[:4]
    name, text = decode_revert(sel + b"\x22" * 32)
    assert name == "UUPSUnsupportedProxiableUUID"
    assert text.startswith("UUPSUnsupportedProxiableUUID(slot=0x2222")
    reason = keccak(text="Error(string)")[:4] + encode(
        ["string"], ["Upgrades are permanently disabled"]
    )
    assert decode_revert(reason) == ("", "Upgrades are permanently disabled")
    panic = keccak(text="Panic(uint256)")[:4] + encode(["uint256"], [0x11])
    assert decode_revert(panic) == ("Panic", "panic 0x11 (arithmetic overflow)")
    assert decode_revert(b"") == ("", "reverted without a reason")
    assert decode_revert(bytes.fromhex("deadbeef")) == ("", "unknown custom error 0xdeadbeef")
    extra = [{"type": "error", "name": "Custom", "inputs": [{"name": "n", "type": "uint256"}]}]
    custom = keccak(text="Custom(uint256)")[:4] + encode(["uint256"], [7])
    assert decode_revert(custom, extra) == ("Custom", "Custom(n=7)")
    assert decode_revert(reason[:10])[1].startswith("malformed revert data")


def test_every_custom_error_of_the_contracts_is_known():
    for name in ("DstackKms", "DstackApp"):
        for e in artifact(name)["abi"]:
            if e["type"] == "error":
                types = [i["type"] for i in e["inputs"]]
                sig = f"{e['name']}({','.join(types)})"
                data = keccak(text=sig)[:4] + encode(
                    types, [b"\x01" * 32 if t == "bytes32" else "0x" + "22" * 20 for t in types]
                )
                assert decode_revert(data)[0] == e["name"]


def v(label: str, slot: int, kind: str, offset: int = 0) -> dict:
    return {"label": label, "slot": str(slot), "offset": offset, "type": kind}


def test_storage_layout_compatibility():
    old = [v("a", 0, "mapping(bytes32 => bool)"), v("b", 1, "bool"), v("c", 1, "bool", 1)]
    old.append(v("__gap", 2, "uint256[49]"))
    assert layout_problems(old, [*old, v("added", 51, "uint256")]) == []
    renamed = [v("x", 0, "mapping(bytes32 => bool)"), *old[1:]]
    assert layout_problems(old, renamed) == []
    shrunk = [*old[:3], v("added", 2, "uint256"), v("__gap", 3, "uint256[48]")]
    assert layout_problems(old, shrunk) == []
    retyped = [old[0], v("b", 1, "address"), *old[2:]]
    assert layout_problems(old, retyped) == ["b (bool) at slot 1 offset 0 becomes address"]
    assert layout_problems(old, [old[0], *old[2:]]) == ["b (bool) at slot 1 offset 0 is gone"]
    packed = [*old, v("new", 1, "uint8", 2)]
    assert layout_problems(old, packed) == ["new is inserted at slot 1, inside existing storage"]
    shifted = [v("new", 0, "uint256"), *[{**e, "slot": str(int(e["slot"]) + 1)} for e in old]]
    assert layout_problems(old, shifted)[0] == (
        "a (mapping(bytes32 => bool)) at slot 0 offset 0 becomes uint256"
    )


def test_node_urls_are_shown_without_secrets():
    assert public_url("https://user:pw@rpc.example:8443/v3/KEY?token=t#x") == (
        "https://rpc.example:8443"
    )
    assert public_url("http://[::1]:8545/") == "http://[::1]:8545"
    assert public_url("http://127.0.0.1/key") == "http://127.0.0.1"
