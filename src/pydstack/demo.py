"""the main job: a local dstack (mock PCCS, KMS, dstack-gateway, dstack-vmm) deploying a sample
app end to end and reaching it the way users do, through the gateway.

    python -m pydstack.demo [--dir ./run/demo] [--port 18080] [--serve] [--backend qemu]

1. a mock PCCS, a KMS, an image registry, a local ACME server (pebble, validating DNS-01 through
   a bind9 primary for `dstack.localhost`), dstack-gateway and dstack-vmm start as real
   processes under DIR (whatever an earlier, killed run left there is stopped first); the
   gateway's certbot, given a ZT-domain through its admin API, orders the wildcard
   `*.dstack.localhost` from pebble by DNS-01 (RFC 2136 to the bind9) and serves it;
2. the sample app's image is built locally (podman) and pushed once to the registry, which the
   CVM pulls it from; its docker-compose file becomes an app-compose with the KMS as key
   provider and one encrypted secret;
3. the KMS's allowlist admits that compose hash; `dstack deploy` encrypts the secret to the app's
   env key (after checking the KMS's signature on it) and creates the CVM (gateway enabled, and a
   port mapping for debugging);
4. the CVM boots (progress shown): RTMR3 measurement, keys from the KMS over RA-TLS, encrypted
   storage, registration with the gateway over RA-TLS and a WireGuard tunnel, the app's
   container;
5. as a user would, we reach the app at `https://<app_id>-8080.dstack.localhost:<proxy port>`
   through the gateway (TLS verified against pebble's issuing root), ask it for a key and a quote,
   verify the quote against the mock root and replay its event log to the compose hash.
With `--backend qemu` the CVM is a QEMU VM booting the guest image built from Debian packages
(built once, cached in .cache/guest-image), under KVM where it works, else TCG; the boot time
and the VM's idle memory are printed.
With `--serve` everything keeps running (web UI on the VMM's address, the app's gateway URL
printed) until Ctrl-C or SIGTERM;
either way the CVM is removed, the processes stopped and the CVM bridge with its firewall and
NAT rules removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx

from pydstack.apps.image import ImageError, hello_image
from pydstack.attest.eventlog import event_log_from_json, replay_rtmrs
from pydstack.attest.verify import CollateralCache, verify_quote
from pydstack.devgateway import GatewayHttp
from pydstack.devstack import DevStack, StackError
from pydstack.vmm import cli
from pydstack.vmm.backends.qemu.backend import STATE_FILE as QEMU_STATE
from pydstack.vmm.backends.qemu.image_build import ImageBuildError
from pydstack.vmm.backends.qemu.image_cache import cached_image

COMPOSE = """services:
  hello:
    image: {image}
    restart: always
    environment:
      PORT: "8080"
      GREETING: ${{GREETING:-hi}}
    volumes:
      - /var/run/dstack.sock:/var/run/dstack.sock
      - data:/data
volumes:
  data:
"""


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def _say(text: str) -> None:
    print(text, flush=True)


def _cli(*args: str) -> str:
    """run a `dstack` command in-process, returning what it printed."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = cli.main(list(args))
    except SystemExit as e:  # the cli exits on errors it has already printed
        code = int(e.code or 1)
    if code:
        raise StackError(f"dstack {args[0]} failed")
    return out.getvalue()


def _qemu_rss_mib(stack: DevStack, vm_id: str) -> float | None:
    """the resident memory of the vm's QEMU process, MiB (None when it cannot be read)."""
    try:
        state = json.loads((stack.dir / "run" / "vm" / vm_id / QEMU_STATE).read_text())
        for line in Path(f"/proc/{int(state['pid'])}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, KeyError):
        pass
    return None


def run(directory: Path, port: int, keep_serving: bool, backend: str = "sandbox") -> int:
    qemu_image = None
    if backend == "qemu":
        _step("building (or reusing) the qemu guest image from debian packages")
        try:
            qemu_image = cached_image("dev", say=lambda s: print(f"    {s}", flush=True))
        except ImageBuildError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"    {qemu_image}")
    stack = DevStack(directory, backend=backend, qemu_image=qemu_image, gateway=True, acme=True)
    web: GatewayHttp | None = None
    try:
        _step(
            f"starting a local pccs, kms, image registry, acme server (pebble + bind9), "
            f"dstack-gateway and dstack-vmm in {directory}"
        )
        stack.start(progress=sys.stdout)
        os.environ["DSTACK_VMM_URL"] = stack.vmm_url
        _step("building the sample app's image locally with podman, pushing it to the registry")
        local = hello_image()
        image = stack.push_image(local)
        print(
            f"    {local} -> {stack.registry_push} as {image} (cvms pull it from {stack.registry})"
        )

        app_dir = directory / "app"
        app_dir.mkdir(parents=True, exist_ok=True)
        (app_dir / "docker-compose.yml").write_text(COMPOSE.format(image=image))
        env = app_dir / "secrets.env"
        env.write_text("GREETING=hello from an encrypted env\n")
        os.chmod(env, 0o600)
        _step("writing the app-compose (kms key provider, gateway, GREETING allowed)")
        out = _cli(
            "compose", "--name", "hello", "--docker-compose", str(app_dir / "docker-compose.yml"),
            "--kms", "--gateway", "--env-file", str(env),
            "--output", str(app_dir / "app-compose.json"),
        )  # fmt: skip
        compose_hash = out.split("Compose hash:")[1].split()[0]
        app_id = compose_hash[:40]
        print(f"    compose hash {compose_hash}")
        _step(f"allowing app {app_id} with that compose hash in the kms")
        stack.allow({app_id: [compose_hash]})

        _step(f"deploying through `dstack deploy` (port 127.0.0.1:{port} -> 8080)")
        vm_args = [
            "--simulated-tee",
            "dstack-tdx",
            "--vcpu",
            "2",
            "--memory",
            "1024",
            "--disk",
            "2",
        ]
        out = _cli(
            "deploy", "--name", "hello", "--image", stack.image_name,
            "--compose", str(app_dir / "app-compose.json"), "--env-file", str(env),
            "--kms-encrypt-url", stack.kms_url, "--port", f"tcp:127.0.0.1:{port}:8080",
            *(vm_args if backend == "qemu" else []),
        )  # fmt: skip
        vm_id = out.split("Created VM with ID:")[1].split()[0]
        print(f"    vm {vm_id}")
        t0 = time.monotonic()
        info = stack.wait_vm(
            vm_id,
            timeout=600 if backend == "qemu" else 180,
            on_progress=lambda p: _say(f"    boot: {p} ({time.monotonic() - t0:.1f} s)"),
        )
        stack.wait_http(f"http://127.0.0.1:{port}/health", timeout=120)
        print(
            f"    boot to app running: {time.monotonic() - t0:.1f} s; "
            f"instance {info.get('instance_id')}"
        )
        if backend == "qemu":
            time.sleep(5)  # idle
            rss = _qemu_rss_mib(stack, vm_id)
            accel = "tcg" if "runs under tcg" in (stack.dir / "vmm.log").read_text() else "kvm"
            sysinfo = stack.guest("SysInfo", vm_id)
            used = (int(sysinfo["total_memory"]) - int(sysinfo["available_memory"])) >> 20
            print(
                f"    idle memory: {used} MiB used in the vm, {rss or 0:.0f} MiB rss of its qemu "
                f"({accel}, a 1024 MiB vm)"
            )
        print(_cli("lsvm"), end="")

        name = f"{app_id}-8080"
        cert = stack.wait_gateway_cert()
        print(
            f"    the gateway serves *.{stack.base_domain} from pebble (acme dns-01 via bind9),"
            f" until {time.strftime('%Y-%m-%d', time.gmtime(cert['not_after']))}"
        )
        web = GatewayHttp(stack.gateway_ca, stack.gateway_proxy_port)
        _step(f"reaching the app through the gateway at {web.url(name)}/")
        health = web.wait(name)
        print(f"    https, verified against {stack.gateway_ca}: {health.status_code}")
        by_instance = web.get(f"{info.get('instance_id')}-8080", "/health")
        _step("asking the app (inside the cvm) for a key and a quote, through the gateway")
        key = web.get(name, "/key", {"path": "demo/wallet", "purpose": "signing"})
        key.raise_for_status()
        nonce = hashlib.sha256(b"demo nonce").digest()
        quote = web.get(name, "/quote", {"report_data": nonce.hex()})
        quote.raise_for_status()
        greeting = web.get(name, "/env", {"name": "GREETING"}).json().get("value")
        print(f"    key for demo/wallet: {key.json()['key'][:16]}... (derived by the kms)")

        _step("verifying the quote as a remote verifier would")
        q = quote.json()
        raw = bytes.fromhex(q["quote"])
        root = stack.root_ca.read_bytes()
        collateral = asyncio.run(CollateralCache(stack.pccs_url).get(raw, root_ca_der=root))
        verified = verify_quote(raw, collateral, root_ca_der=root)
        report = verified.quote.td_report
        assert report is not None
        events = event_log_from_json(q["event_log"])
        measured = {e.event: e.event_payload for e in events if e.imr == 3}
        want = hashlib.sha256((app_dir / "app-compose.json").read_bytes()).digest()
        checks = {
            "the app answered through the gateway by app id (tls verified)": health.status_code
            == 200,
            "and by instance id": by_instance.status_code == 200,
            f"dcap signature chain and tcb ({verified.status})": True,
            "report_data carries our nonce": report.report_data[:32] == nonce,
            "event log replays to RTMR0-3": replay_rtmrs(events) == report.rtmrs,
            "RTMR3 measured this app-compose.json": measured.get("compose-hash") == want,
            "the encrypted secret reached the container": greeting == "hello from an encrypted env",
        }
        for name, good in checks.items():
            print(f"    [{'ok' if good else 'FAILED'}] {name}")
        if not all(checks.values()):
            return 1
        if keep_serving:
            # from here a ctrl-c or SIGTERM is the way to stop: the teardown below follows
            with contextlib.suppress(KeyboardInterrupt):
                print(f"web ui:  {stack.vmm_url}/", flush=True)
                print(
                    f"the app: {web.url(name)}/  (also /key?path=..., /quote?report_data=...)",
                    flush=True,
                )
                print(
                    f"         curl --cacert {stack.gateway_ca} {web.url(name)}/health"
                    f"  (direct, for debugging: http://127.0.0.1:{port}/)",
                    flush=True,
                )
                print(
                    f"gateway: {stack.gateway_admin}/ "
                    f"(admin token in {stack.gateway_files.config})",
                    flush=True,
                )
                print(f"cli:     DSTACK_VMM_URL={stack.vmm_url} .venv/bin/dstack lsvm", flush=True)
                print("press ctrl-c to stop", flush=True)
                while True:
                    time.sleep(3600)
        _step("done")
        return 0
    except (StackError, ImageError, httpx.HTTPError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        vmm_log = directory / "vmm.log"
        if vmm_log.exists():
            print(vmm_log.read_text()[-2000:], file=sys.stderr)
        return 1
    finally:
        # a second ctrl-c or SIGTERM must not cut the teardown short (the few commands it runs
        # inherit the ignored dispositions, which is harmless for them)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if web is not None:
            web.close()
        _step("removing the cvm and stopping the stack")
        stack.stop(remove_bridge=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pydstack.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dir", type=Path, default=Path("run/demo"))
    parser.add_argument("--port", type=int, default=18080, help="host port for the app")
    parser.add_argument("--serve", action="store_true", help="keep everything running")
    parser.add_argument("--backend", choices=("sandbox", "qemu"), default="sandbox")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("error: the dev stack needs root (its cvm bridge; namespaces, mounts, mmdebstrap)",
              file=sys.stderr)  # fmt: skip
        return 2
    # SIGTERM ends --serve like ctrl-c does (a blocked signal mask would be inherited by the
    # stack's processes and the cvms, which then could not be stopped)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return run(args.dir.resolve(), args.port, args.serve, args.backend)
    except KeyboardInterrupt:  # before serving: the stack is already down (run's finally)
        return 130


if __name__ == "__main__":
    sys.exit(main())
