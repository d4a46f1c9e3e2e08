#!/usr/bin/env bash
# The test command (README, `make test`, .ci/run): install what is missing, start a real
# two-node SLURM cluster (with accounting) and an MLflow server, run the whole pytest suite
# (slow end-to-end tests included), stop the services whatever happened.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -x. The paper recipes'
# smoke runs train a covering subset of each recipe's methods here; `make test-recipes`
# (scripts/test.sh -m recipes --all-methods) trains every method of every recipe.
# `scripts/test.sh --fast` (make test-fast): the static checks and the tier without services
# (-m "not slow"), nothing started.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
FAST=0
if [[ "${1:-}" == "--fast" ]]; then FAST=1; shift; fi
bash scripts/setup.sh
bash scripts/lint.sh
# the real path, not the ./.venv link: paths inside the venv (e.g. those DeepSpeed compiles its
# CPU comm op against, cached in TORCH_EXTENSIONS_DIR) must not change from clone to clone
VENV="$(readlink -f "${HFBENCH_VENV:-$ROOT/.venv}")"
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/hfbench/numba}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/hfbench/torch_extensions}"
export MPLBACKEND=Agg
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this clone, whatever the shared venv points at
# pytest workers (pytest-xdist): one per core, at most 4 (each holds torch, ~0.5 GB);
# HFBENCH_TEST_WORKERS=1 runs everything in one process. The SLURM tests always share one
# worker and run in order, as do tests sharing a module-scoped fixture (tests/conftest.py).
WORKERS="${HFBENCH_TEST_WORKERS:-$(nproc 2>/dev/null || echo 2)}"
((WORKERS <= 4)) || WORKERS=4
PARALLEL=()
((WORKERS <= 1)) || PARALLEL=(-n "$WORKERS" --dist loadgroup)
if ((FAST)); then
  exec "$VENV/bin/python" -m pytest -p no:cacheprovider ${PARALLEL[@]+"${PARALLEL[@]}"} -m "not slow" "$@"
fi
STATE="${HFBENCH_SERVICES_DIR:-$(mktemp -d /tmp/hfbench-services.XXXXXX)}"
export HFBENCH_SERVICES_DIR="$STATE"
cleanup() { bash "$ROOT/scripts/services.sh" stop "$STATE" >/dev/null 2>&1 || true; }
trap cleanup EXIT INT TERM
echo "[test] starting SLURM + MLflow in $STATE"
bash scripts/services.sh start "$STATE"
# shellcheck disable=SC1091
source "$STATE/env.sh"
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/hfbench/numba}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/hfbench/torch_extensions}"
export MPLBACKEND=Agg
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this clone, whatever the shared venv points at
# A full run (no arguments) rewrites docs/reliability.md: each promise, its tests and their outcomes.
(($#)) || export HFBENCH_RELIABILITY_DOC="$ROOT/docs/reliability.md"
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider ${PARALLEL[@]+"${PARALLEL[@]}"} "$@"
rc=$?
set -e
exit $rc
