#!/usr/bin/env bash
# The main job on the default benchmark: install what is missing, run configs/demo.yaml
# (SLURM array when a cluster answers, local processes otherwise; MLflow in ./mlflow.db
# unless HFBENCH_MLFLOW_URI is set) and write the report to reports/demo/.
# Extra arguments go to `hfbench sweep`, e.g. scripts/demo.sh --parallelism 4
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
start=$(date +%s)
bash scripts/setup.sh
# the real path, not the ./.venv link: paths inside the venv (e.g. those DeepSpeed compiles its
# CPU comm op against, cached in TORCH_EXTENSIONS_DIR) must not change from clone to clone
VENV="$(readlink -f "${HFBENCH_VENV:-$ROOT/.venv}")"
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/hfbench/numba}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/hfbench/torch_extensions}"
export MPLBACKEND=Agg
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this clone, whatever the shared venv points at
"$VENV/bin/hfbench" sweep configs/demo.yaml "$@"
"$VENV/bin/hfbench" report --experiment demo --out reports/demo
echo "[demo] finished in $(( $(date +%s) - start )) s; open reports/demo/index.html"
