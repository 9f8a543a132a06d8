"""`dstack-kms-chain` as an operator uses it, on anvil: the whole contract lifecycle (deploy,
register, allow, upgrade keeping state, two-step ownership, disable upgrades, revoke), dry runs
that change nothing, and every bad input refused in one line with nothing sent."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import coincurve
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from eth_account import Account

from pydstack.kms.anvil import DEV_PRIVATE_KEY, Anvil
from pydstack.kms.bootinfo import BootInfo
from pydstack.kms.chain import Chain
from pydstack.kms.chain_cli import main

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "contracts/artifacts"
OS_IMAGE, MR, KMS_DEVICE = "0a" * 32, "0e" * 32, "0d" * 32
COMPOSE, COMPOSE2, DEVICE = "c1" * 32, "c2" * 32, "d1" * 32
#: a contract that answers 32 bytes of 0x2a to any call (no ERC-165)
ANSWERS_42 = "0x600a600c600039600a6000f3602a60005260206000f3"


@pytest.fixture(scope="module")
def node():
    with Anvil() as n:
        yield n


@pytest.fixture
def keys(node, tmp_path):
    """key files of the deployer and of a second, funded account."""
    chain = Chain.connect(node.url, node.chain_id, DEV_PRIVATE_KEY)
    other = Account.create()
    chain.w3.eth.send_transaction(
        {"from": chain.w3.eth.accounts[0], "to": other.address, "value": 10**18}
    )
    out = {}
    for name, key in (("owner", DEV_PRIVATE_KEY), ("other", other.key.hex())):
        path = tmp_path / f"{name}.key"
        path.write_text(key)
        path.chmod(0o600)
        out[name] = path
    return out, chain, other.address


class Cli:
    def __init__(self, node, capsys, key: Path | None) -> None:
        self.node, self.capsys, self.key = node, capsys, key

    def run(self, *args: str, key: Path | None = None, chain_id: int | None = None):
        argv = ["--rpc-url", self.node.url, "--chain-id", str(chain_id or self.node.chain_id)]
        if key or self.key:
            argv += ["--private-key-file", str(key or self.key)]
        rc = main([*argv, "--json", *args])
        out, err = self.capsys.readouterr()
        return rc, out, err

    def ok(self, *args: str, key: Path | None = None) -> dict:
        rc, out, err = self.run(*args, key=key)
        assert rc == 0, err
        assert err == ""
        return json.loads(out)

    def refused(self, *args: str, key: Path | None = None, chain_id: int | None = None) -> str:
        """the one-line error of a refused command (exit 2, nothing on stdout)."""
        rc, out, err = self.run(*args, key=key, chain_id=chain_id)
        assert rc == 2, (args, out, err)
        assert out == ""
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err


def boot_file(tmp_path: Path, app: str, **kw: bytes) -> str:
    fields = dict(
        tee_variant="dstack-tdx",
        mr_aggregated=bytes.fromhex(MR),
        os_image_hash=bytes.fromhex(OS_IMAGE),
        mr_system=b"\x01" * 32,
        app_id=bytes.fromhex(app[2:]),
        compose_hash=bytes.fromhex(COMPOSE),
        instance_id=b"\x02" * 20,
        device_id=bytes.fromhex(DEVICE),
        key_provider_info=b"",
        tcb_status="UpToDate",
    )
    fields.update(kw)
    path = tmp_path / f"boot-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(BootInfo(**fields).to_json_obj()))
    return str(path)


def listed(entries: list[dict]) -> list[str]:
    return [e["value"] for e in entries]


def test_the_whole_lifecycle_through_the_cli(node, keys, capsys, tmp_path):
    files, chain, other = keys
    owner = chain.address
    cli = Cli(node, capsys, files["owner"])
    as_other = files["other"]

    kms = cli.ok("deploy")["kms"]
    k = ["--kms", kms]
    k256 = coincurve.PrivateKey(b"\x07" * 32).public_key.format(compressed=True)
    ca = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    info = tmp_path / "kms-info.json"
    info.write_text(json.dumps({"k256Pubkey": k256.hex(), "caPubkey": ca.hex(), "quote": "abcd"}))
    cli.ok(*k, "set-kms-info", str(info))
    cli.ok(*k, "set-gateway-app-id", "gateway-1")
    for cmd, what, value in (
        ("add-os-image", "os image", OS_IMAGE),
        ("add-kms-mr", "kms aggregated mr", MR),
        ("add-kms-device", "kms device", KMS_DEVICE),
    ):
        assert cli.ok(*k, cmd, value)["changes"] == [
            {"what": f"{what} 0x{value}", "from": False, "to": True}
        ]
    app = cli.ok(
        *k, "create-app", "--compose-hash", COMPOSE, "--device", DEVICE, "--no-any-device"
    )["app_id"]
    a = ["--app", app]
    boot = boot_file(tmp_path, app)
    assert cli.ok(*k, "check-app", boot) == {"allowed": True, "reason": ""}
    cli.ok(*k, "add-compose-hash", *a, COMPOSE2)
    # an app created elsewhere (by another kms) registered here
    elsewhere = cli.ok("--kms", cli.ok("deploy")["kms"], "create-app")["app_id"]
    assert cli.ok(*k, "register-app", elsewhere)["changes"][0]["to"] is True

    # a dry run reports and sends nothing
    block = chain.block_number()
    dry = cli.ok(*k, "remove-os-image", "--dry-run", OS_IMAGE)
    assert dry["dry_run"] is True and dry["calls"][0]["simulation"] == "ok"
    assert dry["changes"] == [{"what": f"os image 0x{OS_IMAGE}", "from": True, "to": False}]
    dry = cli.ok(*k, "upgrade", "--dry-run", "--artifact", str(ARTIFACTS / "DstackKmsV2.json"))
    assert dry["changes"][0]["from"] == chain.implementation(kms)
    assert chain.block_number() == block

    # upgrades keep the state, and run the migration call
    before = cli.ok(*k, "show", *a)
    up = cli.ok(
        *k, "upgrade", "--artifact", str(ARTIFACTS / "DstackKmsV2.json"), "--call", "initializeV2()"
    )
    assert chain.implementation(kms) == up["implementation"] != before["implementation"]
    v2 = chain.contract("DstackKmsV2", kms).functions
    assert v2.kmsVersion().call() == 2 and v2.migratedAtBlock().call() == up["block"]
    up = cli.ok(
        *k,
        "upgrade",
        *a,
        "--artifact",
        str(ARTIFACTS / "DstackAppV3.json"),
        "--call",
        "initializeV2()",
    )
    after = cli.ok(*k, "show", *a)
    assert after["app"]["version"] == 3
    for state in (before, after):
        del state["implementation"], state["app"]["implementation"], state["app"]["version"]
    assert after == before
    assert listed(after["os_images"]) == [f"0x{OS_IMAGE}"]
    assert listed(after["kms_aggregated_mrs"]) == [f"0x{MR}"]
    assert listed(after["kms_devices"]) == [f"0x{KMS_DEVICE}"]
    assert listed(after["registered_apps"]) == [app, elsewhere]
    assert listed(after["app"]["compose_hashes"]) == [f"0x{COMPOSE}", f"0x{COMPOSE2}"]
    assert listed(after["app"]["devices"]) == [f"0x{DEVICE}"]
    assert after["kms_info"]["k256_pubkey"] == "0x" + k256.hex()
    assert after["gateway_app_id"] == "gateway-1"
    assert all(e["block"] > 0 for e in after["os_images"] + after["app"]["compose_hashes"])
    assert cli.ok(*k, "check-app", boot) == {"allowed": True, "reason": ""}
    new_impl = cli.ok(*k, "set-app-implementation", "--artifact", str(ARTIFACTS / "DstackApp.json"))
    assert cli.ok(*k, "show")["app_implementation"] == new_impl["app_implementation"]

    # two-step ownership of the kms and of the app
    for target in ([], a):
        pending = cli.ok(*k, "transfer-ownership", *target, other)
        assert pending["changes"] == [{"what": "pending owner", "from": None, "to": other}]
        shown = cli.ok(*k, "show", *a)
        assert (shown["app"] if target else shown)["owner"] == owner
        err = cli.refused(*k, "accept-ownership", *target)
        assert f"the sender {owner} is not the pending owner {other}" in err
        cli.ok(*k, "accept-ownership", *target, key=as_other)
        shown = cli.ok(*k, "show", *a)
        assert (shown["app"] if target else shown)["owner"] == other
        assert (shown["app"] if target else shown)["pending_owner"] is None
    # the former owner is refused by the contract: its custom error decoded by name
    err = cli.refused(*k, "remove-os-image", OS_IMAGE)
    assert f"OwnableUnauthorizedAccount(account={owner}): the sender is not the owner" in err
    err = cli.refused(*k, "remove-compose-hash", *a, COMPOSE)
    assert "OwnableUnauthorizedAccount" in err

    # disable upgrades: final
    assert cli.ok(*k, "disable-upgrades", *a, key=as_other)["changes"][0]["to"] is True
    assert cli.ok(*k, "show", *a)["app"]["upgrades_disabled"] is True
    err = cli.refused(
        *k, "upgrade", *a, "--artifact", str(ARTIFACTS / "DstackAppV3.json"), key=as_other
    )
    assert "upgrades of app" in err and "permanently disabled" in err

    # revoke: the compose hash, then the os image
    cli.ok(*k, "remove-compose-hash", *a, COMPOSE, key=as_other)
    rc, out, _ = cli.run(*k, "check-app", boot)
    assert rc == 1 and json.loads(out)["reason"] == "Compose hash not allowed"
    cli.ok(*k, "remove-os-image", OS_IMAGE, key=as_other)
    boot2 = boot_file(tmp_path, app, compose_hash=bytes.fromhex(COMPOSE2))
    rc, out, _ = cli.run(*k, "check-app", boot2)
    assert rc == 1 and json.loads(out)["reason"] == "OS image is not allowed"
    shown = cli.ok(*k, "show", *a)
    assert shown["os_images"] == [] and listed(shown["app"]["compose_hashes"]) == [f"0x{COMPOSE2}"]


def test_bad_input_is_refused_and_nothing_is_sent(node, keys, capsys, tmp_path):
    files, chain, _ = keys
    cli = Cli(node, capsys, files["owner"])
    kms = cli.ok("deploy")["kms"]
    k = ["--kms", kms]
    app = cli.ok(*k, "create-app", "--compose-hash", COMPOSE)["app_id"]
    a = ["--app", app]
    eoa = Account.create().address
    tx = chain.w3.eth.send_transaction({"from": chain.w3.eth.accounts[0], "data": ANSWERS_42})
    no_erc165 = chain.w3.eth.wait_for_transaction_receipt(tx)["contractAddress"]
    bad_checksum = "0x" + app[2:].swapcase()
    assert bad_checksum.lower() == app.lower() and bad_checksum != app
    layout = tmp_path / "layout.json"
    doc = json.loads((ARTIFACTS / "DstackAppV3.json").read_text())
    doc["storageLayout"][1]["type"] = "address"  # _upgradesDisabled retyped
    layout.write_text(json.dumps(doc))
    short = "ab" * 31
    v2 = str(ARTIFACTS / "DstackKmsV2.json")
    block = chain.block_number()
    cases = [
        (("add-compose-hash", *a, short), "compose hash must be 32 bytes (64 hex digits), got 62"),
        (("add-os-image", short), "os image must be 32 bytes (64 hex digits), got 62"),
        (("add-os-image", "0x" + short), "os image must be 32 bytes"),
        (("create-app", "--compose-hash", short), "compose hash must be 32 bytes"),
        (("create-app", "--device", "zz" * 32), "device 'zz"),
        (("add-os-image", ""), "os image is empty"),
        (("add-kms-mr", "00" * 32), "kms aggregated mr is all zeros"),
        (("add-device", *a, "xy" * 32), "is not hex"),
        (("remove-compose-hash", *a, "cd" * 32), "is not allowed on app"),
        (("remove-os-image", OS_IMAGE), "nothing to remove"),
        (("remove-device", *a, DEVICE), "nothing to remove"),
        (("add-compose-hash", "--app", eoa, COMPOSE2), "has no contract code on chain 31337"),
        (("add-compose-hash", "--app", kms, COMPOSE2), "is not a DstackApp"),
        (("add-compose-hash", "--app", no_erc165, COMPOSE2), "does not declare IAppAuth"),
        (("add-compose-hash", "--app", bad_checksum, COMPOSE2), "wrong EIP-55 checksum"),
        (("show", "--app", eoa), "has no contract code"),
        (("register-app", eoa), "has no contract code"),
        (("register-app", no_erc165), "does not declare IAppAuth"),
        (("register-app", "0x" + "00" * 20), "is the zero address"),
        (("transfer-ownership", bad_checksum), "wrong EIP-55 checksum"),
        (("transfer-ownership", "0x" + "00" * 20), "new owner is the zero address"),
        (("transfer-ownership", chain.address), "already owns kms"),
        (("accept-ownership",), "has no ownership transfer pending"),
        (("upgrade", "--implementation", eoa), "has no contract code"),
        (("upgrade", "--implementation", kms), "is not a UUPS implementation"),
        (("upgrade", "--implementation", app), "is an app contract"),
        (("upgrade", *a, "--artifact", str(ARTIFACTS / "DstackKmsV2.json")), "would corrupt"),
        (("upgrade", *a, "--artifact", str(layout)), "_upgradesDisabled (bool) at slot 1"),
        (("upgrade", "--artifact", v2, "--call", "migrate(uint256)"), "without arguments"),
        (("upgrade", "--artifact", v2, "--call", "migrate()"), "has no such function"),
        (("upgrade", "--artifact", v2, "--call-data", "0xabc"), "--call-data is not hex"),
        (("set-app-implementation", "--implementation", kms), "is not a DstackApp"),
        (("set-kms-info", str(tmp_path / "missing.json")), "cannot read kms info"),
    ]
    for args, message in cases:
        err = cli.refused(*k, *args)
        assert message in err, (args, err)
        assert "Traceback" not in err
    for kms_arg, message in (
        (eoa, "kms contract 0x"),
        (app, "is an app contract (it declares IAppAuthBasicManagement), not a DstackKms"),
        (no_erc165, "does not declare IAppAuth"),
        ("0x" + kms[2:].swapcase(), "wrong EIP-55 checksum"),
        ("0x1234", "is not an address"),
    ):
        assert message in cli.refused("--kms", kms_arg, "show")
    # not the owner: refused by the contract, decoded, before anything is sent
    err = cli.refused(*k, "add-os-image", OS_IMAGE, key=files["other"])
    assert "addOsImageHash" in err and "OwnableUnauthorizedAccount(account=" in err
    err = cli.refused(
        *k, "upgrade", "--artifact", str(ARTIFACTS / "DstackKmsV2.json"), key=files["other"]
    )
    assert f"is not the owner {chain.address}" in err
    err = cli.refused(*k, "accept-ownership", key=files["other"])
    assert "no ownership transfer pending" in err
    assert chain.block_number() == block
    # a node that is down, or on another chain: one line
    assert "chain id mismatch: the node at" in cli.refused(*k, "show", chain_id=5)
    gone = SimpleNamespace(url="http://127.0.0.1:1/v3/secret-api-key?t=secret", chain_id=1)
    down = Cli(gone, capsys, files["owner"])
    err = down.refused(*k, "show")
    assert "cannot reach the node at http://127.0.0.1:1: connection failed" in err
    assert "secret" not in err
