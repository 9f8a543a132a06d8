#!/usr/bin/env bash
# compile contracts/ with solc from the npm registry; --check verifies the committed artifacts.
set -euo pipefail
cd "$(dirname "$0")/../contracts"
[ -d node_modules/solc ] || npm ci --no-audit --no-fund --silent
exec node build.mjs "$@"
