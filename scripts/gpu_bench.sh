#!/usr/bin/env bash
# One prepared run on a GPU machine that has only this repository (no internet): training
# overhead of Hyperflux against dense, and the 2:4 inference speed-up, on ResNet-50 and DeiT-S
# with generated ImageNet-shaped inputs (224 px).
#
#   scripts/gpu_wheels.sh            # here: the few wheels the GPU image lacks, into .whl/
#   scripts/gpu_bench.sh [WHEEL_DIR (.whl)]   # there
#
# Sections (each under its own time limit, so one failure or hang does not cost the others):
#   nm_<model>.json       hfbench bench nm: dense vs torch.sparse.to_sparse_semi_structured, fp16,
#                         batch 1 and 256
#   overhead_<model>_<dtype>.json
#                         hfbench bench overhead --methods $METHODS (default hyperflux): training
#                         step time and img/s against dense, bf16 and fp16 autocast, batch 128
#                         (plain PyTorch; DEEPSPEED=1 steps through deepspeed.initialize when the
#                         machine has DeepSpeed)
#   gpu_bench.log         everything printed
# Results go to $OUT (default ./gpu_bench_out). Knobs (environment): PYTHON, MODELS
# ("resnet50 deit_small"), DTYPES ("bf16 fp16"), BATCH (128), STEPS (10), WARMUP (5),
# REPEATS (5), METHODS (hyperflux), NM_BATCHES (1,256), SECTION_S (time limit per section, 150).
# The same script on a CPU with a tiny setting (the CPU path: CSR instead of 2:4 kernels):
#   MODELS=resnet50 DTYPES=bf16 SIZE=32 BATCH=4 STEPS=1 WARMUP=1 REPEATS=2 NM_BATCHES=1,4 scripts/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-.whl}
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_bench_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_bench.log"
: > "$LOG"
say() { echo "$*" | tee -a "$LOG"; }

# modules the bench imports that the GPU image may lack (module:package)
need=()
for spec in torch:torch torchvision:torchvision timm:timm pydantic:pydantic yaml:pyyaml numpy:numpy scipy:scipy; do
  mod=${spec%%:*}; pkg=${spec#*:}
  "$PY" -c "import $mod" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "${DEEPSPEED:-0}" = 1 ] && ! "$PY" -c "import deepspeed" >/dev/null 2>&1; then need+=(deepspeed); fi
if [ ${#need[@]} -gt 0 ]; then
  if [ ! -d "$WHEELS" ]; then
    say "gpu_bench: missing ${need[*]} and no wheel folder '$WHEELS' (make one here with scripts/gpu_wheels.sh)"
    exit 2
  fi
  say "gpu_bench: installing ${need[*]} from $WHEELS"
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" "${need[@]}" 2>&1 | tee -a "$LOG" || exit 2
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import torch; print('gpu_bench: torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>&1 | tee -a "$LOG"
LIMIT=${SECTION_S:-150}
failed=0
section() {  # name, command...
  local name=$1; shift
  say "=== $name ($(date -u +%H:%M:%S))"
  timeout "$LIMIT" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ]; then say "=== $name FAILED (exit $rc$([ "$rc" = 124 ] && echo ", over ${LIMIT}s"))"; failed=$((failed + 1)); fi
}
size=()
[ -n "${SIZE:-}" ] && size=(--size "$SIZE")
ds=()
[ "${DEEPSPEED:-0}" = 1 ] && ds=(--deepspeed)
for m in ${MODELS:-resnet50 deit_small}; do
  section "2:4 inference $m" "$PY" -m launchers.cli bench nm --model "$m" "${size[@]}" --dtype fp16 \
    --batches "${NM_BATCHES:-1,256}" --json "$OUT/nm_$m.json"
done
for m in ${MODELS:-resnet50 deit_small}; do
  for dt in ${DTYPES:-bf16 fp16}; do
    cl=()
    [ "$m" = resnet50 ] && cl=(--channels-last)
    section "training overhead $m $dt" "$PY" -m launchers.cli bench overhead --model "$m" --size "${SIZE:-224}" \
      --batch "${BATCH:-128}" --dtype "$dt" "${cl[@]}" "${ds[@]}" --methods "${METHODS:-hyperflux}" \
      --steps "${STEPS:-10}" --warmup "${WARMUP:-5}" --repeats "${REPEATS:-5}" --no-track \
      --json "$OUT/overhead_${m}_$dt.json"
  done
done
say "gpu_bench: done, $failed section(s) failed; results in $OUT"
exit $((failed > 0))
