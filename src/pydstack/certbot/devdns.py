"""a real authoritative DNS server and a real ACME server for tests and development.

:class:`DevBind` runs Debian's bind9 (``named -g``) from a generated config in a directory of
its own, on a loopback address and a free port, primary for the given zones with RFC 2136
updates allowed to one TSIG key. :class:`DevPebble` runs Debian's ``pebble`` with its own TLS
certificate (``ca_bundle`` trusts it), ``-dnsserver`` pointed at the bind9 so DNS-01 challenges
are really validated, no random sleeps, no nonce rejections and no authorization reuse.

``python -m pydstack.certbot.devdns --dir D --zone example.test`` starts both and writes what a
certbot needs (directory URL, CA bundle, DNS server, TSIG key) to ``D/devdns.json`` (mode
0600), prints ``devdns <that path>`` and runs until SIGINT/SIGTERM.

Both raise :class:`~pydstack.errors.UnavailableError` when the program is missing or does not
come up (its log's tail in the message).
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import ipaddress
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pydstack.errors import UnavailableError

from .model import Rfc2136Provider

START_TIMEOUT = 30.0
TSIG_KEY = "certbot-update"


def free_port(host: str = "127.0.0.1") -> int:
    """a port free for both TCP and UDP on `host` (at the time of asking)."""
    import socket

    for _ in range(50):
        with socket.socket() as t:
            t.bind((host, 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((host, port))
                except OSError:
                    continue
            return port
    raise UnavailableError("no free port")


def _program(name: str) -> str:
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None
    )
    if path is None:
        raise UnavailableError(f"{name} is not installed (scripts/setup.sh installs it)")
    return path


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@dataclass
class DevBind:
    """bind9 serving `zones` on `host`:`port`, updatable with the TSIG key."""

    directory: Path
    host: str
    port: int
    zones: tuple[str, ...]
    key_name: str
    key_secret: str = field(repr=False)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def server(self) -> str:
        return f"{self.host}:{self.port}"

    def provider(self, zone: str | None = None) -> Rfc2136Provider:
        """an RFC 2136 credential for this server."""
        return Rfc2136Provider(self.server, self.key_name, self.key_secret, "hmac-sha256", zone)

    @classmethod
    def start(
        cls,
        directory: Path,
        zones: tuple[str, ...] = ("example.test",),
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> DevBind:
        named = _program("named")
        directory.mkdir(parents=True, exist_ok=True)
        port = port or free_port(host)
        secret = base64.b64encode(secrets.token_bytes(32)).decode()
        bind = cls(directory, host, port, zones, TSIG_KEY, secret)
        bind._write_config()
        log = directory / "named.log"
        with open(log, "ab") as out:
            bind.proc = subprocess.Popen(
                [named, "-g", "-n", "1", "-c", str(directory / "named.conf")],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        bind._wait(log)
        return bind

    def _write_config(self) -> None:
        d = self.directory
        zones = []
        for zone in self.zones:
            (d / f"{zone}.zone").write_text(
                f"$TTL 60\n@ IN SOA ns.{zone}. hostmaster.{zone}. 1 60 60 3600 60\n"
                f"@ IN NS ns.{zone}.\nns IN A {self.host}\n"
            )
            zones.append(
                f'zone "{zone}" {{ type primary; file "{d / zone}.zone";'
                f" update-policy {{ grant {self.key_name} zonesub ANY; }}; }};"
            )
        listen = "listen-on-v6" if ipaddress.ip_address(self.host).version == 6 else "listen-on"
        other = "listen-on" if listen == "listen-on-v6" else "listen-on-v6"
        (d / "named.conf").write_text(
            f"""options {{
  directory "{d}";
  pid-file none;
  {listen} port {self.port} {{ {self.host}; }};
  {other} {{ none; }};
  recursion no;
  dnssec-validation no;
  notify no;
  session-keyfile "{d}/session.key";
  managed-keys-directory "{d}";
}};
controls {{ }};
key "{self.key_name}" {{ algorithm hmac-sha256; secret "{self.key_secret}"; }};
"""
            + "\n".join(zones)
            + "\n"
        )

    def _wait(self, log: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        q = dns.message.make_query(self.zones[0], dns.rdatatype.SOA)
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise UnavailableError(f"named exited: {_tail(log)}")
            try:
                r = dns.query.udp(q, self.host, port=self.port, timeout=0.5)
                if r.answer:
                    return
            except (OSError, dns.exception.DNSException):
                pass
            time.sleep(0.1)
        self.stop()
        raise UnavailableError(f"named did not answer within {START_TIMEOUT:.0f} s: {_tail(log)}")

    def query(self, name: str, rtype: str) -> list[str]:
        """the records of `rtype` at `name`, as text (a test's view of the zone)."""
        r = dns.query.tcp(dns.message.make_query(name, rtype), self.host, port=self.port, timeout=5)
        out: list[str] = []
        for rrset in r.answer:
            out.extend(rd.to_text() for rd in rrset)
        return sorted(out)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


def _self_signed(directory: Path, host: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble dev listener")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(host))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "pebble-tls.pem", directory / "pebble-tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


@dataclass
class DevPebble:
    """pebble at `directory_url`, its TLS trusted by `ca_bundle`, validating through
    `dns_server`."""

    directory: Path
    host: str
    port: int
    management_port: int
    dns_server: str
    ca_bundle: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def directory_url(self) -> str:
        return f"https://{self.host}:{self.port}/dir"

    @classmethod
    def start(
        cls,
        directory: Path,
        dns_server: str,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> DevPebble:
        pebble = _program("pebble")
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = _self_signed(directory, host)
        port = port or free_port(host)
        mport = free_port(host)
        config = {
            "pebble": {
                "listenAddress": f"{host}:{port}",
                "managementListenAddress": f"{host}:{mport}",
                "certificate": str(cert),
                "privateKey": str(key),
                "httpPort": free_port(host),
                "tlsPort": free_port(host),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        (directory / "pebble.json").write_text(json.dumps(config))
        run_env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_WFE_NONCEREJECT": "0",
            "PEBBLE_AUTHZREUSE": "0",
            **(env or {}),
        }
        peb = cls(directory, host, port, mport, dns_server, cert)
        log = directory / "pebble.log"
        with open(log, "ab") as out:
            peb.proc = subprocess.Popen(
                [pebble, "-config", str(directory / "pebble.json"), "-dnsserver", dns_server],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=run_env,
                start_new_session=True,
            )
        peb._wait(log)
        return peb

    def _wait(self, log: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise UnavailableError(f"pebble exited: {_tail(log)}")
            try:
                if httpx.get(self.directory_url, verify=self._tls(), timeout=1).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise UnavailableError(f"pebble did not come up within {START_TIMEOUT:.0f} s: {_tail(log)}")

    def _tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def root_pem(self) -> str:
        """the root of the chains pebble issues (pebble makes a new one each start)."""
        url = f"https://{self.host}:{self.management_port}/roots/0"
        return httpx.get(url, verify=self._tls(), timeout=10).text

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run bind9 and pebble for local ACME DNS-01")
    ap.add_argument("--dir", type=Path, required=True, help="working directory")
    ap.add_argument("--zone", action="append", help="zone to serve (repeatable)")
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args(argv)
    zones = tuple(args.zone or ["example.test"])
    bind = DevBind.start(args.dir / "bind", zones, host=args.host)
    try:
        peb = DevPebble.start(args.dir / "pebble", bind.server, host=args.host)
    except UnavailableError:
        bind.stop()
        raise
    info = {
        "acme_url": peb.directory_url,
        "ca_bundle": str(peb.ca_bundle),
        "dns_server": bind.server,
        "zones": list(zones),
        "tsig_key_name": bind.key_name,
        "tsig_secret": bind.key_secret,
    }
    out = args.dir / "devdns.json"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    print(f"devdns {out}", flush=True)
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        while not stop and bind.proc is not None and bind.proc.poll() is None:
            time.sleep(0.5)
    finally:
        peb.stop()
        bind.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
