#!/usr/bin/env bash
# install whatever is missing on a fresh Debian-like machine: system packages, node tools and a
# Python virtual environment with pydstack and its development tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# system packages the stack and its tests use (real components, no mocks)
# podman/runc run the apps' containers, gocryptfs+fuse3 encrypt sandbox CVM disks, busybox-static
# builds the test images (binutils' strip slims their shared libraries), chromium drives the web UI test, iptables NATs the CVM bridge,
# docker-registry (CNCF distribution) holds the images CVMs pull; qemu-system-x86, qemu-utils and
# socat run qemu CVMs, mmdebstrap and squashfs-tools build their guest image; haproxy, nginx and
# wrk are what benchmarks/bench_gateway.py measures the gateway against; pebble (an ACME server)
# and bind9 (an authoritative DNS server taking RFC 2136 updates) are what the certbot gets its
# DNS-01 certificates from in tests and the dev stack, bind9-dnsutils for looking at them;
# wireguard-tools (wg) and wireguard-go (userspace, for kernels without the module) carry the
# gateway's tunnels to CVMs, installed without recommends (those would pull a kernel image in);
# etcd-server is the gateway cluster's shared store (tests start their own members).
APT_PACKAGES=(iproute2 curl ca-certificates podman runc gocryptfs fuse3 busybox-static chromium
    iptables uidmap util-linux docker-registry qemu-system-x86 qemu-utils socat mmdebstrap
    squashfs-tools haproxy nginx wrk pebble bind9 bind9-dnsutils etcd-server binutils)
APT_BARE=(wireguard-tools wireguard-go)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
missing_bare=()
for p in "${APT_BARE[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing_bare+=("$p")
done
if [ "${#missing[@]}" -gt 0 ] || [ "${#missing_bare[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing ${missing[*]} ${missing_bare[*]}"
        apt-get update -qq
        if [ "${#missing[@]}" -gt 0 ]; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
        fi
        if [ "${#missing_bare[@]}" -gt 0 ]; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                "${missing_bare[@]}" >/dev/null
        fi
    else
        echo "setup: missing system packages ${missing[*]} ${missing_bare[*]} (run as root to install)" >&2
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
stamp=.venv/.pydstack-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing pydstack and its development tools into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
    touch "$stamp"
fi
# byte-compile the sources (quick when up to date): with PYTHONDONTWRITEBYTECODE set, as on CI
# machines, each process would compile them again; a sandbox CVM's guest alone imports 0.4 s of them
.venv/bin/python -m compileall -q -j 0 src/pydstack >/dev/null

# node toolchain for the contracts: solc, OpenZeppelin and anvil from the npm registry
if command -v npm >/dev/null 2>&1; then
    if [ ! -d contracts/node_modules/solc ] || [ contracts/package-lock.json -nt contracts/node_modules/.package-lock.json ]; then
        echo "setup: installing the contracts toolchain (npm ci in contracts/)"
        (cd contracts && npm ci --no-audit --no-fund --silent)
    fi
else
    echo "setup: npm not found; contract tests need node and npm" >&2
fi
