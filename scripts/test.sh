#!/usr/bin/env bash
# install what is missing, then run lint, type checks and the whole test suite.
#   bash scripts/test.sh            everything (what CI runs)
#   bash scripts/test.sh --unit     lint, types and the unit tests only (no root, seconds)
#   bash scripts/test.sh ARGS...    extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
marker=()
if [ "${1:-}" = "--unit" ]; then
    shift
    marker=(-m "not integration")
fi
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check src tests benchmarks fuzz
.venv/bin/ruff format --check src tests benchmarks fuzz
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/pytest -q -p no:cacheprovider "${marker[@]}" "$@"
