#!/usr/bin/env bash
# Download HERE the few wheels that scripts/gpu_bench.sh needs on the bare, offline GPU machine.
#
#   scripts/gpu_wheels.sh [WHEEL_DIR (.whl)] [PYTHON_VERSION of the GPU machine (3.12)]
#
# The GPU image brings its own CUDA PyTorch, torchvision, timm, numpy, scipy and pyyaml; the
# bench runs plain PyTorch (no DeepSpeed) and writes JSON (no MLflow), so all it lacks is
# pydantic (the run configs) and pydantic's own small dependencies, built for that Python.
# No torch is downloaded. The script checks that the wheels plus the working tree that travels
# with them stay under the device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PYV=${2:-3.12}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo "$(readlink -f .venv)/bin/python" || echo python3)}
LIMIT_MB=64
rm -rf "$DIR"
mkdir -p "$DIR"
# the version tested here, so that the GPU machine runs what the tests ran
PYD=$("$PY" -c 'import pydantic; print(pydantic.VERSION)' 2>/dev/null || echo "")
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
"$PY" -m pip download -q -d "$DIR" --only-binary=:all: --python-version "$PYV" --implementation cp "${plat[@]}" \
  "pydantic${PYD:+==$PYD}"
ls -la "$DIR"
wheels_kib=$(du -sk "$DIR" | cut -f1)
# what travels with a device call: tracked files and untracked files git does not ignore
tree_kib=$(git ls-files -co --exclude-standard -z | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total_mb=$(( (wheels_kib + tree_kib) / 1024 ))
echo "gpu_wheels: wheels $((wheels_kib / 1024)) MiB + working tree $((tree_kib / 1024)) MiB = ${total_mb} MiB (limit ${LIMIT_MB})"
if (( total_mb >= LIMIT_MB )); then
  echo "gpu_wheels: over the ${LIMIT_MB} MiB a device call carries" >&2
  exit 1
fi
