#!/usr/bin/env bash
# Download HERE the wheels scripts/gpu_bench.sh installs on a GPU machine without internet.
#
#   scripts/gpu_wheels.sh [WHEEL_DIR (wheels)] [PYTHON_VERSION of the GPU machine (3.11)]
#
# torch/torchvision are the CUDA builds pip resolves for linux x86_64 (several GB);
# DeepSpeed ships only a source archive, so it is built here into a wheel with
# DS_BUILD_OPS=0 (pure Python; ops JIT-compile on first use there).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-wheels}
PYV=${2:-3.11}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo "$(readlink -f .venv)/bin/python" || echo python3)}
mkdir -p "$DIR"
TORCH=${TORCH_SPEC:-torch==2.14.1}
TV=${TORCHVISION_SPEC:-torchvision==0.29.1}
DS=${DEEPSPEED_SPEC:-deepspeed==0.19.8}
plat=(--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
      --platform linux_x86_64)
"$PY" -m pip download -d "$DIR" --only-binary=:all: --python-version "$PYV" --implementation cp "${plat[@]}" \
  "$TORCH" "$TV" pydantic pyyaml numpy scipy hjson msgpack ninja packaging psutil py-cpuinfo tqdm einops
# the DeepSpeed wheel (its build imports torch: use an environment that has it, no isolation)
DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -w "$DIR" "$DS"
ls -la "$DIR"
