"""replication: a second kms gets the root keys over mutually attested tls, then both derive
the same app keys; kms self-authorization and attested rpc certificates on the way; a proxy that
sends the key request to another server gets nothing stored."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import subprocess
import sys
import urllib.parse

import httpx
import pytest
from google.protobuf.empty_pb2 import Empty

from pydstack.attest.attestation import decode_versioned
from pydstack.attest.identity import AppInfo
from pydstack.crypto.certs import cert_pem, generate_p256_key, key_pem
from pydstack.guest.kms_client import get_app_keys
from pydstack.kms.keys import FILES, KeyStore, ca_certs, rpc_cert
from pydstack.rpc.proto import kms_rpc_pb2 as pb
from pydstack.rpc.server import CallContext, PrpcServer, PrpcService, RpcError

from .kms_proc import OS_IMAGE, SEED, Pccs, allowlist, start_kms, write_config
from .simulator_proc import start_simulator
from .test_kms_keys import COMPOSE, VM_CONFIG, App


def kms_mr(sock) -> str:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=30) as c:
        att = bytes.fromhex(
            c.post("http://localhost/Attest", json={"report_data": "00" * 64}).json()["attestation"]
        )
    return (
        "0x"
        + AppInfo.from_attestation(decode_versioned(att), boottime_mr=False).mr_aggregated.hex()
    )


@pytest.mark.parametrize("allow_replica", [True, False])
async def test_onboarded_replica_derives_the_same_keys(tmp_path, allow_replica):
    pccs = Pccs(tmp_path / "root.der")
    sim_a = start_simulator(tmp_path / "agent-a", SEED.hex())
    sim_b = start_simulator(tmp_path / "agent-b", SEED.hex())
    procs = []
    try:
        compose_hash = hashlib.sha256(COMPOSE).hexdigest()
        mrs = [kms_mr(sim_a.dstack_sock)] + ([kms_mr(sim_b.dstack_sock)] if allow_replica else [])
        allow = tmp_path / "allow.json"
        allowlist(
            allow,
            os_images=[hashlib.sha256(OS_IMAGE.encode()).hexdigest()],
            apps={compose_hash[:40]: {"composeHashes": [compose_hash], "allowAnyDevice": True}},
            kms={"mrAggregated": mrs, "allowAnyDevice": True},
        )
        (tmp_path / "a").mkdir()
        cfg_a = write_config(
            tmp_path / "a", pccs.url, tmp_path / "root.der", allow, agent=sim_a.dstack_sock
        )
        kms_a = start_kms(cfg_a)
        procs.append(kms_a)
        (tmp_path / "b").mkdir()
        cfg_b = write_config(
            tmp_path / "b",
            pccs.url,
            tmp_path / "root.der",
            allow,
            agent=sim_b.dstack_sock,
            source_url=kms_a.url,
        )
        if not allow_replica:
            import subprocess
            import sys

            out = subprocess.run(
                [sys.executable, "-m", "pydstack.kms.main", "-c", str(cfg_b)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert out.returncode == 2
            assert "KMS is not allowed: aggregated MR not allowed" in out.stderr
            assert not (tmp_path / "b/certs/root-k256.key").exists()
            return
        kms_b = start_kms(cfg_b)
        procs.append(kms_b)
        a, b = KeyStore(tmp_path / "a/certs").load(), KeyStore(tmp_path / "b/certs").load()
        assert a.root_k256 == b.root_k256
        assert a.rpc_cert.public_key() != b.rpc_cert.public_key()
        keys_a, _ = await get_app_keys(kms_a.url, App().attest, VM_CONFIG)
        keys_b, _ = await get_app_keys(kms_b.url, App().attest, VM_CONFIG)
        assert (keys_a.k256_key, keys_a.env_crypt_key, keys_a.disk_crypt_key) == (
            keys_b.k256_key,
            keys_b.env_crypt_key,
            keys_b.disk_crypt_key,
        )
        # an app not in the allowlist is still refused by the replica
        with pytest.raises(RpcError, match="app not registered"):
            await get_app_keys(kms_b.url, App(compose=b"{}").attest, VM_CONFIG)
        assert json.loads(allow.read_text())["kms"]["mrAggregated"] == mrs
    finally:
        for p in procs:
            p.stop()
        sim_a.stop()
        sim_b.stop()
        pccs.stop()


class SplitProxy:
    """a tcp proxy: the first connection goes to `first`, every later one to `later`."""

    def __init__(self, first: int, later: int) -> None:
        self.first, self.later = first, later
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"https://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        port = self.first if self.connections == 1 else self.later
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class FakeKms:
    """an attacker's kms: any tls certificate, any client, its own root keys for anyone."""

    def __init__(self) -> None:
        self.root_key, self.tmp_key = generate_p256_key(), generate_p256_key()
        self.root_cert, self.tmp_cert = ca_certs(self.root_key, self.tmp_key)
        self.k256 = b"\xee" * 32
        self.rpc_key = generate_p256_key()
        self.rpc_cert = rpc_cert("kms.local", self.rpc_key, self.root_key, self.root_cert)
        self.key_requests = 0

    async def GetTempCaCert(self, req: Empty, ctx: CallContext) -> pb.GetTempCaCertResponse:
        return pb.GetTempCaCertResponse(
            temp_ca_cert=cert_pem(self.tmp_cert),
            temp_ca_key=key_pem(self.tmp_key),
            ca_cert=cert_pem(self.root_cert),
        )

    async def GetKmsKey(self, req: pb.GetKmsKeyRequest, ctx: CallContext) -> pb.KmsKeyResponse:
        self.key_requests += 1
        return pb.KmsKeyResponse(
            temp_ca_key=key_pem(self.tmp_key),
            keys=[pb.KmsKeys(ca_key=key_pem(self.root_key), k256_key=self.k256)],
        )

    async def serve(self) -> tuple[PrpcServer, int]:
        server = PrpcServer()
        server.mount(
            PrpcService(pb.DESCRIPTOR.services_by_name["KMS"], self, prefix="/prpc/", trim="KMS.")
        )
        port = await server.listen_tls(
            "127.0.0.1",
            0,
            cert_pem=cert_pem(self.rpc_cert) + cert_pem(self.root_cert),
            key_pem=key_pem(self.rpc_key),
        )
        return server, port


@contextlib.asynccontextmanager
async def source_and_replica(tmp_path):
    """a running source kms (simulator a) and the config parts of a replica (simulator b), both
    allowed as kms; yields (source, make_replica_config(source_url))."""
    pccs = Pccs(tmp_path / "root.der")
    sim_a = start_simulator(tmp_path / "agent-a", SEED.hex())
    sim_b = start_simulator(tmp_path / "agent-b", SEED.hex())
    source = None
    try:
        allow = tmp_path / "allow.json"
        allowlist(
            allow,
            os_images=[hashlib.sha256(OS_IMAGE.encode()).hexdigest()],
            apps={},
            kms={
                "mrAggregated": [kms_mr(sim_a.dstack_sock), kms_mr(sim_b.dstack_sock)],
                "allowAnyDevice": True,
            },
        )
        (tmp_path / "a").mkdir()
        source = start_kms(
            write_config(
                tmp_path / "a", pccs.url, tmp_path / "root.der", allow, agent=sim_a.dstack_sock
            )
        )

        def replica_config(source_url: str):
            (tmp_path / "b").mkdir(exist_ok=True)
            return write_config(
                tmp_path / "b",
                pccs.url,
                tmp_path / "root.der",
                allow,
                agent=sim_b.dstack_sock,
                source_url=source_url,
            )

        yield source, replica_config
    finally:
        if source is not None:
            source.stop()
        sim_a.stop()
        sim_b.stop()
        pccs.stop()


def _port(url: str) -> int:
    port = urllib.parse.urlsplit(url).port
    assert port is not None
    return port


async def test_onboarding_through_a_forwarding_proxy(tmp_path):
    async with source_and_replica(tmp_path) as (source, replica_config):
        proxy = SplitProxy(_port(source.url), _port(source.url))
        url = await proxy.start()
        try:
            replica = await asyncio.to_thread(start_kms, replica_config(url))
            replica.stop()
        finally:
            await proxy.close()
        assert proxy.connections >= 2  # the temp ca and the key request both went through it
        a, b = KeyStore(tmp_path / "a/certs").load(), KeyStore(tmp_path / "b/certs").load()
        assert a.root_k256 == b.root_k256
        assert a.root_ca_key.private_numbers() == b.root_ca_key.private_numbers()


async def test_onboarding_refuses_a_proxy_that_swaps_the_source(tmp_path):
    """the proxy sends the attested first connection to the real source and the key request to
    an attacker's kms: the replica refuses it by its key and stores nothing."""
    fake = FakeKms()
    fake_server, fake_port = await fake.serve()
    async with source_and_replica(tmp_path) as (source, replica_config):
        proxy = SplitProxy(_port(source.url), fake_port)
        url = await proxy.start()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pydstack.kms.main", "-c", str(replica_config(url))],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None
            line = await asyncio.to_thread(proc.stdout.readline)
            if line:  # it came up: stop it, then the assertions below say what went wrong
                proc.terminate()
            _, err = await asyncio.to_thread(proc.communicate, None, 60)
        finally:
            await proxy.close()
            await fake_server.close()
    assert proxy.connections >= 2  # the attack was made
    assert proc.returncode == 2 and "listening on" not in line, err[-2000:]
    assert "source kms key mismatch" in err and "refusing to onboard" in err, err[-2000:]
    assert fake.key_requests == 0  # refused at the handshake: not even the request went out
    certs = tmp_path / "b/certs"
    assert not any((certs / f).exists() for f in FILES)
    if certs.exists():
        assert all(fake.k256 not in f.read_bytes() for f in certs.iterdir() if f.is_file())
