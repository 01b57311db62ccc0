#!/usr/bin/env bash
# Regenerate the Python stubs from the .proto files (needs grpcio-tools, a dev dependency).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/edgellm/v1/control.proto protos/edgellm/v1/shards.proto
