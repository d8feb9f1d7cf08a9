#!/usr/bin/env bash
# Regenerates the committed gRPC stubs from proto/ with the pinned grpcio-tools (pyproject dev extra).
# With --check, regenerates into a temporary copy and fails if the committed stubs differ.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PATH="$(dirname "$PY"):$PATH"
out=proto
if [[ "${1:-}" == "--check" ]]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
fi
"$PY" -m grpc_tools.protoc -Iproto --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" proto/tenantflow/v1/tenantflow.proto >/dev/null
if [[ "${1:-}" == "--check" ]]; then
  for f in tenantflow_pb2.py tenantflow_pb2.pyi tenantflow_pb2_grpc.py tenantflow_pb2_grpc.pyi; do
    if ! diff -q "$out/tenantflow/v1/$f" "proto/tenantflow/v1/$f" >/dev/null; then
      echo "proto/tenantflow/v1/$f is stale: run scripts/gen_proto.sh and commit the result" >&2
      exit 1
    fi
  done
  echo "generated stubs are up to date"
fi
