#!/usr/bin/env bash
# install what is missing, then run the main job (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pydstack.demo "$@"
