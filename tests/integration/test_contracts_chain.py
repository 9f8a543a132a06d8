"""DstackKms / DstackApp on a real EVM (anvil), through web3.py; and dstack-kms with eth auth."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from eth_account import Account
from web3 import Web3

from pydstack.kms.anvil import DEV_PRIVATE_KEY, Anvil
from pydstack.kms.bootinfo import BootInfo
from pydstack.kms.chain import Chain, ChainError, KmsContract, artifact, bytes32

REPO = Path(__file__).resolve().parents[2]
OS_IMAGE = b"\x0a" * 32
COMPOSE = b"\x0c" * 32
DEVICE = b"\x0d" * 32
MR = b"\x0e" * 32


@pytest.fixture(scope="module")
def chain():
    with Anvil() as node:
        yield node, Chain.connect(node.url, node.chain_id, DEV_PRIVATE_KEY)


@pytest.fixture(scope="module")
def kms(chain):
    _, ch = chain
    k = KmsContract(ch, ch.deploy_kms())
    k.call("addOsImageHash", OS_IMAGE)
    k.call("setGatewayAppId", "gateway-1")
    return k


def boot(app_id: str = "0x" + "00" * 20, **kw) -> BootInfo:
    base = dict(
        tee_variant="dstack-tdx",
        mr_aggregated=MR,
        os_image_hash=OS_IMAGE,
        mr_system=b"\x01" * 32,
        app_id=bytes.fromhex(app_id[2:]),
        compose_hash=COMPOSE,
        instance_id=b"\x02" * 20,
        device_id=DEVICE,
        key_provider_info=b"",
        tcb_status="UpToDate",
        advisory_ids=(),
    )
    base.update(kw)
    return BootInfo(**base)


def test_artifacts_match_sources():
    out = subprocess.run(
        ["bash", str(REPO / "scripts/build-contracts.sh"), "--check"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "artifacts match the sources" in out.stdout


def test_selectors_and_topics_match_upstream():
    def sel(name: str, abi: list) -> str:
        fn = next(f for f in abi if f.get("name") == name and f["type"] == "function")
        types = ",".join(
            "(" + ",".join(c["type"] for c in i["components"]) + ")" + i["type"][5:]
            if i["type"].startswith("tuple")
            else i["type"]
            for i in fn["inputs"]
        )
        return Web3.keccak(text=f"{name}({types})")[:4].hex()

    kms_abi = artifact("DstackKms")["abi"]
    assert sel("isAppAllowed", kms_abi) == "1e079198"
    assert sel("isKmsAllowed", kms_abi) == "e067ec9d"
    assert Web3.keccak(text="initialize(address,address)")[:4].hex() == "485cc955"
    assert Web3.keccak(text="PolicyChanged(address,bytes32,bytes32,bool)").hex() == (
        "341d3bc64e32172fc5bcf27b0f7f69dc5adc19af64b7aa1dee361e5883c32375"
    )
    assert Web3.keccak(text="AppDeployedViaFactory(address,address)").hex() == (
        "fd86d7f6962eba3b7a3bf9129c06c0b2f885e1c61ef2c9f0dbb856be0deefdee"
    )
    names = {f.get("name") for f in artifact("DstackApp")["abi"]}
    assert {
        "addComposeHash",
        "removeComposeHash",
        "addDevice",
        "setAllowAnyDevice",
        "setRequireTcbUpToDate",
        "disableUpgrades",
        "isAppAllowed",
        "version",
    } <= names


def test_app_policy_decisions(kms):
    app = kms.deploy_and_register_app(
        allow_any_device=False, device_id=DEVICE, compose_hash=COMPOSE
    )
    assert kms.is_app_allowed(boot(app)) == (True, "")
    cases = [
        (boot(), "App not registered"),
        (boot(app, os_image_hash=b"\x0b" * 32), "OS image is not allowed"),
        (boot(app, compose_hash=b"\x0f" * 32), "Compose hash not allowed"),
        (boot(app, device_id=b"\x09" * 32), "Device not allowed"),
    ]
    for b, reason in cases:
        assert kms.is_app_allowed(b) == (False, reason)
    kms.app_call(app, "removeComposeHash", COMPOSE)
    assert kms.is_app_allowed(boot(app)) == (False, "Compose hash not allowed")
    kms.app_call(app, "addComposeHash", COMPOSE)
    kms.app_call(app, "setAllowAnyDevice", True)
    assert kms.is_app_allowed(boot(app, device_id=b"\x09" * 32)) == (True, "")
    assert kms.is_app_allowed(boot(app, tcb_status="OutOfDate")) == (True, "")
    kms.app_call(app, "setRequireTcbUpToDate", True)
    assert kms.is_app_allowed(boot(app, tcb_status="OutOfDate")) == (
        False,
        "TCB status is not up to date",
    )
    assert kms.gateway_app_id() == "gateway-1"


def test_kms_policy_decisions(kms):
    assert kms.is_kms_allowed(boot()) == (False, "Aggregated MR not allowed")
    kms.call("addKmsAggregatedMr", MR)
    assert kms.is_kms_allowed(boot()) == (False, "KMS is not allowed to boot on this device")
    kms.call("addKmsDevice", DEVICE)
    assert kms.is_kms_allowed(boot()) == (True, "")
    assert kms.is_kms_allowed(boot(tcb_status="SWHardeningNeeded")) == (
        False,
        "TCB status is not up to date",
    )
    assert kms.is_kms_allowed(boot(os_image_hash=b"\x01" * 32)) == (
        False,
        "OS image is not allowed",
    )


def test_only_owner_and_two_step_ownership(chain, kms):
    node, ch = chain
    other = Account.create()
    ch.w3.eth.send_transaction(
        {"from": ch.w3.eth.accounts[0], "to": other.address, "value": 10**18}
    )
    stranger = Chain.connect(node.url, node.chain_id, other.key.hex())
    with pytest.raises(ChainError, match=r"OwnableUnauthorizedAccount|revert"):
        stranger.send(
            stranger.contract("DstackKms", kms.address).functions.addOsImageHash(bytes32("01" * 32))
        )
    kms.call("transferOwnership", other.address)
    assert kms.c.functions.owner().call() == ch.account.address
    assert kms.c.functions.pendingOwner().call() == other.address
    stranger.send(stranger.contract("DstackKms", kms.address).functions.acceptOwnership())
    assert kms.c.functions.owner().call() == other.address
    stranger.send(
        stranger.contract("DstackKms", kms.address).functions.transferOwnership(ch.account.address)
    )
    kms.call("acceptOwnership")
    assert kms.c.functions.owner().call() == ch.account.address


def test_upgrades_keep_storage(chain, kms):
    _, ch = chain
    app = kms.deploy_and_register_app(compose_hash=COMPOSE)
    kms_v2 = ch.deploy("DstackKmsV2")
    kms.call("upgradeToAndCall", kms_v2, b"")
    upgraded = ch.contract("DstackKmsV2", kms.address)
    assert upgraded.functions.kmsVersion().call() == 2
    assert upgraded.functions.allowedOsImages(OS_IMAGE).call() is True
    assert upgraded.functions.registeredApps(app).call() is True
    assert upgraded.functions.gatewayAppId().call() == "gateway-1"
    app_v3 = ch.deploy("DstackAppV3")
    kms.app_call(app, "upgradeToAndCall", app_v3, b"")
    assert kms.app(app).functions.version().call() == 3
    assert kms.app(app).functions.allowedComposeHashes(COMPOSE).call() is True
    kms.app_call(app, "disableUpgrades")
    with pytest.raises(ChainError, match="Upgrades are permanently disabled"):
        kms.app_call(app, "upgradeToAndCall", app_v3, b"")


def test_chain_id_is_pinned(chain):
    node, _ = chain
    with pytest.raises(ChainError, match="chain id mismatch"):
        Chain.connect(node.url, 1)


async def test_kms_with_eth_auth(chain, kms, tmp_path):
    """end to end: dstack-kms asks the contract before releasing keys."""
    from pydstack.guest.instance import InstanceInfo
    from pydstack.guest.kms_client import get_app_keys
    from pydstack.rpc.server import RpcError

    from .kms_proc import Pccs, start_kms, write_config
    from .test_kms_keys import VM_CONFIG, App

    node, _ = chain
    app = App()
    os_image = bytes.fromhex(json.loads(VM_CONFIG)["os_image_hash"])
    kms.call("addOsImageHash", os_image)
    pccs = Pccs(tmp_path / "root.der")
    cfg = write_config(tmp_path, pccs.url, tmp_path / "root.der", tmp_path / "unused.json")
    text = (
        cfg.read_text()
        .replace('type = "simple"', 'type = "eth"')
        .replace(
            "[core.auth_api.simple]",
            f'[core.auth_api.eth]\nrpc_url = "{node.url}"\nkms_contract = "{kms.address}"\n'
            f"chain_id = {node.chain_id}\n\n[core.auth_api.simple]",
        )
    )
    cfg.write_text(text)
    proc = start_kms(cfg)
    try:
        with pytest.raises(RpcError, match="Boot denied: App not registered"):
            await get_app_keys(proc.url, app.attest, VM_CONFIG)
        # production pins the app id to the app contract's address at deploy time
        contract_app = kms.deploy_and_register_app(compose_hash=hashlib.sha256(b"x").digest())
        pinned = InstanceInfo(b"\x01" * 20, b"", bytes.fromhex(contract_app[2:]))
        app_pinned = App(info=pinned)
        with pytest.raises(RpcError, match="Boot denied: Compose hash not allowed"):
            await get_app_keys(proc.url, app_pinned.attest, VM_CONFIG)
        kms.app_call(contract_app, "addComposeHash", app_pinned.identity.compose_hash)
        keys, _ = await get_app_keys(proc.url, app_pinned.attest, VM_CONFIG)
        assert len(keys.k256_key) == 32 and keys.gateway_app_id == "gateway-1"
    finally:
        proc.stop()
        pccs.stop()


def test_operator_cli(chain, tmp_path):
    import os
    import sys

    node, _ = chain
    key = tmp_path / "key"
    key.write_text(DEV_PRIVATE_KEY)
    key.chmod(0o644)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "pydstack.kms.chain_cli",
                "--rpc-url",
                node.url,
                "--chain-id",
                str(node.chain_id),
                "--private-key-file",
                str(key),
                "--json",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ},
        )

    bad = cli("deploy")
    assert bad.returncode != 0 and "chmod 600" in bad.stderr
    key.chmod(0o600)
    kms = json.loads(cli("deploy").stdout)["kms"]
    app = json.loads(cli("--kms", kms, "create-app").stdout)["app_id"]
    assert cli("--kms", kms, "add-os-image", OS_IMAGE.hex()).returncode == 0
    boot_file = tmp_path / "boot.json"
    boot_file.write_text(json.dumps(boot("0x" + app[2:].lower()).to_json_obj()))
    denied = cli("--kms", kms, "check-app", str(boot_file))
    assert (
        denied.returncode == 1 and json.loads(denied.stdout)["reason"] == "Compose hash not allowed"
    )
    assert cli("--kms", kms, "add-compose-hash", "--app", app, COMPOSE.hex()).returncode == 0
    allowed = cli("--kms", kms, "check-app", str(boot_file))
    assert allowed.returncode == 0 and json.loads(allowed.stdout) == {"allowed": True, "reason": ""}
    shown = json.loads(cli("--kms", kms, "show", "--app", app).stdout)
    assert shown["registered"] is True and shown["allow_any_device"] is True
    wrong = cli("--kms", kms, "show")
    assert wrong.returncode == 0
    chain_mismatch = subprocess.run(
        [
            sys.executable,
            "-m",
            "pydstack.kms.chain_cli",
            "--rpc-url",
            node.url,
            "--chain-id",
            "5",
            "deploy",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert chain_mismatch.returncode == 2 and "chain id mismatch" in chain_mismatch.stderr


async def test_eth_auth_denies_a_short_compose_hash(chain, kms):
    """a 31-byte compose hash whose left-padded form is whitelisted is denied, with the reason,
    before the contract is asked."""
    from pydstack.kms.auth import EthAuth

    node, _ = chain
    short = b"\x0c" * 31
    padded = short.rjust(32, b"\0")
    app = kms.deploy_and_register_app(compose_hash=padded)
    auth = EthAuth(node.url, kms.address, node.chain_id)
    assert (await auth.is_app_allowed(boot(app, compose_hash=padded))).is_allowed
    denied = await auth.is_app_allowed(boot(app, compose_hash=short))
    assert (denied.is_allowed, denied.reason) == (False, "compose hash must be 32 bytes, got 31")
    denied = await auth.is_kms_allowed(boot(compose_hash=short))
    assert (denied.is_allowed, denied.reason) == (False, "compose hash must be 32 bytes, got 31")
