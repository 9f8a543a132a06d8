#!/usr/bin/env bash
# regenerate the protobuf modules under src/pydstack/rpc/proto from their .proto files.
set -euo pipefail
cd "$(dirname "$0")/../src"
../.venv/bin/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. pydstack/rpc/proto/*.proto
