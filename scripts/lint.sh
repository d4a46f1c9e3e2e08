#!/usr/bin/env bash
# Static checks, run by scripts/test.sh before the tests (and alone by `make lint`):
# ruff (lint and format, settings in pyproject.toml) over the whole project, and mypy --strict
# on the pruning interface, the registry and every baseline (the code a new method is written
# against). Fix formatting with: ruff format . && ruff check --fix .
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$(readlink -f "${HFBENCH_VENV:-$ROOT/.venv}")"
echo "[lint] ruff check"
"$VENV/bin/ruff" check --quiet .
echo "[lint] ruff format --check"
"$VENV/bin/ruff" format --check --quiet .
echo "[lint] mypy --strict (pruning interface, registry, baselines)"
"$VENV/bin/mypy" --no-error-summary
echo "[lint] ok"
