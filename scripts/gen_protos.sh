#!/usr/bin/env bash
# Regenerates bgm/v1/*_pb2*.py(i) from protos/. CI runs this and fails on any diff.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# protoc-gen-mypy and protoc-gen-mypy_grpc live beside that interpreter.
export PATH="$(dirname "$PY"):$PATH"
rm -f bgm/v1/*_pb2.py bgm/v1/*_pb2.pyi bgm/v1/*_pb2_grpc.py bgm/v1/*_pb2_grpc.pyi
"$PY" -m grpc_tools.protoc -I protos \
  --python_out=. --grpc_python_out=. --mypy_out=quiet:. --mypy_grpc_out=quiet:. \
  protos/bgm/v1/*.proto
touch bgm/v1/__init__.py
