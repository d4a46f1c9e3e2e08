#!/usr/bin/env bash
# Overhead bench on a GPU machine that has only this repository (no internet).
#
#   scripts/gpu_bench.sh [WHEEL_DIR] [extra `hfbench bench overhead` flags...]
#
# Installs whatever of the Python stack is missing from WHEEL_DIR (made here by
# scripts/gpu_wheels.sh; default: wheels/), then times every method against dense on
# ResNet-50 at 224 px, bf16 autocast, channels_last, through deepspeed.initialize (the
# engine's path), and prints step ms and img/s per method. Results go to $OUT (default
# ./gpu_bench_out): overhead.txt, and bench_mlflow.db when mlflow is importable.
# Knobs (environment): PYTHON, DEVICE (cuda), MODEL (resnet50), SIZE (224), BATCH (128),
# STEPS (10), WARMUP (5), REPEATS (5), DEEPSPEED (1; 0 = plain torch).
# Python part on a CPU with a tiny model:
#   DEVICE=cpu MODEL=fmnist_cnn SIZE=28 BATCH=8 STEPS=1 WARMUP=1 REPEATS=2 scripts/gpu_bench.sh wheels --methods hyperflux
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-wheels}
[ $# -gt 0 ] && shift
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_bench_out}
mkdir -p "$OUT"

# module:package pairs the bench imports (deepspeed's own dependencies come with its wheel)
need=()
for spec in torch:torch torchvision:torchvision deepspeed:deepspeed pydantic:pydantic yaml:pyyaml numpy:numpy \
            scipy:scipy; do
  mod=${spec%%:*}; pkg=${spec#*:}
  "$PY" -c "import $mod" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ ! -d "$WHEELS" ]; then
    echo "gpu_bench: missing ${need[*]} and no wheel folder '$WHEELS' (make one with scripts/gpu_wheels.sh)" >&2
    exit 2
  fi
  echo "gpu_bench: installing ${need[*]} from $WHEELS"
  DS_BUILD_OPS=0 "$PY" -m pip install --no-index --find-links "$WHEELS" "${need[@]}"
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/hfbench/torch_extensions}
track=(--no-track)
if "$PY" -c "import mlflow" >/dev/null 2>&1; then track=(--tracking-uri "sqlite:///$OUT/bench_mlflow.db"); fi
ds=(--deepspeed)
[ "${DEEPSPEED:-1}" = 0 ] && ds=()
"$PY" -c "import torch; print('gpu_bench: torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
"$PY" -m launchers.cli bench overhead --model "${MODEL:-resnet50}" --size "${SIZE:-224}" --batch "${BATCH:-128}" \
  --device "${DEVICE:-cuda}" --dtype bf16 --channels-last "${ds[@]}" --steps "${STEPS:-10}" \
  --warmup "${WARMUP:-5}" --repeats "${REPEATS:-5}" "${track[@]}" "$@" 2>&1 | tee "$OUT/overhead.txt"
