"""DstackKms / DstackApp on a real EVM (anvil), through web3.py; and dstack-kms with eth auth."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from eth_account import Account

from pydstack.kms.anvil import DEV_PRIVATE_KEY, Anvil
from pydstack.kms.bootinfo import BootInfo
from pydstack.kms.chain import Chain, ChainError, KmsContract, bytes32

from .kms_proc import SEED, Pccs, start_kms, write_config

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


def use_eth_auth(cfg: Path, rpc_url: str, kms_contract: str, chain_id: int) -> None:
    """switch a kms.toml of kms_proc.write_config to eth auth."""
    text = (
        cfg.read_text()
        .replace('type = "simple"', 'type = "eth"')
        .replace(
            "[core.auth_api.simple]",
            f'[core.auth_api.eth]\nrpc_url = "{rpc_url}"\nkms_contract = "{kms_contract}"\n'
            f"chain_id = {chain_id}\n\n[core.auth_api.simple]",
        )
    )
    cfg.write_text(text)


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

    from .test_kms_keys import VM_CONFIG, App

    node, _ = chain
    app = App()
    os_image = bytes.fromhex(json.loads(VM_CONFIG)["os_image_hash"])
    kms.call("addOsImageHash", os_image)
    pccs = Pccs(tmp_path / "root.der")
    cfg = write_config(tmp_path, pccs.url, tmp_path / "root.der", tmp_path / "unused.json")
    use_eth_auth(cfg, node.url, kms.address, node.chain_id)
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
    assert shown["app"]["registered"] is True and shown["app"]["allow_any_device"] is True
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


async def test_eth_auth_batch_decides_as_the_contract(chain, kms):
    """EthAuth reads the decision and the gateway app id in one JSON-RPC batch: the same
    answers as web3's calls for allowed and denied apps and KMSs; a node that stops answering
    (or answers garbage) is a denial naming no backend detail."""
    from aiohttp import web

    from pydstack.kms.auth import EthAuth

    node, _ = chain
    app = kms.deploy_and_register_app(compose_hash=COMPOSE)
    auth = EthAuth(node.url, kms.address, node.chain_id)
    try:
        for b in (
            boot(app),
            boot(),
            boot(app, compose_hash=b"\x0f" * 32),
            boot(app, os_image_hash=b"\x0b" * 32),
        ):
            got = await auth.is_app_allowed(b)
            assert (got.is_allowed, got.reason) == kms.is_app_allowed(b)
            assert got.gateway_app_id == kms.gateway_app_id() == "gateway-1"
            got = await auth.is_kms_allowed(b)
            assert (got.is_allowed, got.reason) == kms.is_kms_allowed(b)
        assert (await auth.is_app_allowed(boot(app))).is_allowed
    finally:
        await auth.close()

    async def garbage(_: web.Request) -> web.Response:
        return web.json_response([{"jsonrpc": "2.0", "id": 0, "result": "0x1234"}])

    server = web.Application()
    server.router.add_post("/", garbage)
    runner = web.AppRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        for url in (f"http://127.0.0.1:{port}/", "http://127.0.0.1:9/"):
            auth = EthAuth(node.url, kms.address, node.chain_id)
            auth._rpc.rpc_url = url  # the node went away (or was replaced) after the start
            try:
                denied = await auth.is_app_allowed(boot(app))
            finally:
                await auth.close()
            assert (denied.is_allowed, denied.reason) == (
                False,
                "authorization backend unavailable",
            )
    finally:
        await runner.cleanup()


def run_kms(cfg: Path) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run(
        [sys.executable, "-m", "pydstack.kms.main", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_kms_start_refuses_a_bad_chain_in_one_line(chain, kms, tmp_path):
    """a node that is down, on another chain, or a kms_contract that is not a DstackKms there:
    exit 2 and one error line naming the key to check, no traceback, no rpc secret."""
    node, _ = chain
    app = kms.deploy_and_register_app()
    (tmp_path / "root.der").write_bytes(b"unused: the kms stops before any quote")
    secret_url = "http://127.0.0.1:1/v3/secret-api-key"
    cases = [
        (secret_url, kms.address, node.chain_id, "cannot reach the node at http://127.0.0.1:1"),
        (node.url, kms.address, 5, f"chain id mismatch: the node at {node.url} reports"),
        (node.url, Account.create().address, node.chain_id, "has no contract code on chain"),
        (node.url, app, node.chain_id, "is an app contract"),
        (node.url, "0x" + kms.address[2:].swapcase(), node.chain_id, "wrong EIP-55 checksum"),
    ]
    for i, (url, contract, chain_id, message) in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        cfg = write_config(tmp_path / str(i), "http://127.0.0.1:9", tmp_path / "root.der", tmp_path)
        use_eth_auth(cfg, url, contract, chain_id)
        out = run_kms(cfg)
        assert out.returncode == 2, out.stderr
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("error: core.auth_api.eth: ") and message in last, out.stderr
        assert "Traceback" not in out.stderr and "secret" not in out.stderr


async def test_a_denied_kms_says_what_to_register(chain, kms, tmp_path):
    """the kms's own identity (device id, mr, os image) is in its refusal to start, and
    registering exactly those with dstack-kms-chain lets it start; the denial is logged."""
    from pydstack.kms.chain_cli import main as chain_cli

    from .simulator_proc import start_simulator

    node, ch = chain
    fresh = KmsContract(ch, ch.deploy_kms())
    pccs = Pccs(tmp_path / "root.der")
    sim = start_simulator(tmp_path / "agent", SEED.hex())
    proc = None
    key = tmp_path / "key"
    key.write_text(DEV_PRIVATE_KEY)
    key.chmod(0o600)
    cli = ["--rpc-url", node.url, "--chain-id", str(node.chain_id), "--private-key-file", str(key)]
    try:
        (tmp_path / "kms").mkdir()
        cfg = write_config(
            tmp_path / "kms", pccs.url, tmp_path / "root.der", tmp_path, agent=sim.dstack_sock
        )
        use_eth_auth(cfg, node.url, fresh.address, node.chain_id)
        denied = run_kms(cfg)
        assert denied.returncode == 2
        last = denied.stderr.strip().splitlines()[-1]
        assert last.startswith("error: KMS is not allowed: OS image is not allowed (this kms: ")
        assert "denies this kms: OS image is not allowed" in denied.stderr
        identity = dict(
            part.rsplit(" ", 1) for part in last.split("(this kms: ")[1].rstrip(")").split(", ")
        )
        device = identity["device id"]
        assert device != "0x" + hashlib.sha256(b"").hexdigest()  # from the verified quote
        for cmd, key_name in (("add-os-image", "os image"), ("add-kms-mr", "mr aggregated")):
            assert chain_cli([*cli, "--kms", fresh.address, cmd, identity[key_name]]) == 0
        denied = run_kms(cfg)
        last = denied.stderr.strip().splitlines()[-1]
        assert "KMS is not allowed to boot on this device" in last and device in last
        assert chain_cli([*cli, "--kms", fresh.address, "add-kms-device", device]) == 0
        proc = start_kms(cfg)
        assert proc.url.startswith("https://")
    finally:
        if proc is not None:
            proc.stop()
        sim.stop()
        pccs.stop()
