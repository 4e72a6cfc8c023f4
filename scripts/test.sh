#!/usr/bin/env bash
# Installs everything (Debian packages, .venv with the dev tools) and runs every check CI runs:
# generated code up to date, ruff, mypy, then pytest (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev

echo "== generated protobuf code matches protos/"
bash scripts/gen_protos.sh
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  if [[ -n "$(git status --porcelain -- bgm/v1)" ]]; then
    git status --porcelain -- bgm/v1
    git diff --stat -- bgm/v1
    echo "FAIL: bgm/v1 differs from what protos/ generates; run scripts/gen_protos.sh and commit" >&2
    exit 1
  fi
fi

echo "== ruff"
.venv/bin/ruff check .
echo "== mypy"
.venv/bin/mypy bgm services gateway tools bench

echo "== pytest"
export HF_HUB_OFFLINE=1
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [[ $status -eq 5 ]]; then
  echo "FAIL: pytest collected no tests" >&2
  exit 1
fi
exit $status
