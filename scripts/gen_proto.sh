#!/usr/bin/env bash
# Regenerates the committed gRPC stubs from proto/ with the pinned grpcio-tools (see pyproject dev extra).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PATH="$(dirname "$PY"):$PATH"
"$PY" -m grpc_tools.protoc -Iproto --python_out=proto --grpc_python_out=proto \
  --mypy_out=proto --mypy_grpc_out=proto proto/tenantflow/v1/tenantflow.proto
