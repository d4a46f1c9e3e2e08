#!/usr/bin/env bash
# Install everything hfbench needs on a fresh Debian/Python 3.11 machine, and nothing twice.
#   System packages (apt-get, only when root and only the missing ones): FFCV build deps,
#   SLURM + munge + slurmdbd + mariadb for the local test cluster, the Fashion-MNIST dataset
#   package, chromium (report checks).
#   Python packages: into $HFBENCH_VENV (default ~/.cache/hfbench/venv-<python>), shared by
#   every clone on the machine and re-installed only when the dependency list changes; then
#   this clone is installed into it in editable mode and linked as ./.venv.
set -euo pipefail
# quiet pip: no "installed in a folder not on PATH" warnings, no new-version notice
export PIP_NO_WARN_SCRIPT_LOCATION=1 PIP_DISABLE_PIP_VERSION_CHECK=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
PYVER="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
VENV="${HFBENCH_VENV:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/hfbench/venv-py$PYVER}"
log() { echo "[setup] $*"; }

APT_PKGS=(pkg-config libopencv-dev libturbojpeg0-dev
          munge slurmctld slurmd slurm-client slurmdbd mariadb-server
          dataset-fashion-mnist chromium)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    log "missing system packages (root needed to install): ${missing[*]}" >&2
    log "continuing; what needs them will say so" >&2
  fi
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating venv $VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
fi
# the dependency list decides whether the heavy install runs again
want="$( (sed -n '/^dependencies = \[/,/^\]/p; /^\[project.optional-dependencies\]/,/^$/p' "$ROOT/pyproject.toml";
          grep -E '^\s*(DS_BUILD_OPS=0 )?"\$VENV/bin/pip" install' "${BASH_SOURCE[0]}") | sha256sum | cut -c1-16)"
stamp="$VENV/.hfbench-deps"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  log "installing Python packages into $VENV (first time: ~3 min, ~7 GB)"
  "$VENV/bin/pip" install -q --upgrade pip wheel "setuptools>=68"
  # torch pinned to the builds verified here; numpy/cython/pkgconfig are needed to build ffcv,
  # which does not declare them, hence --no-build-isolation for it
  "$VENV/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1" "numpy>=2" cython pkgconfig
  DS_BUILD_OPS=0 "$VENV/bin/pip" install -q --no-build-isolation "ffcv==1.0.2"
  DS_BUILD_OPS=0 "$VENV/bin/pip" install -q "$ROOT[test]"
  "$VENV/bin/pip" uninstall -q -y hyperflux-bench
  echo "$want" > "$stamp"
fi
# this clone, editable (a few seconds; skipped when the venv already points here)
here="$(cd / && "$VENV/bin/python" -c 'import suite, os; print(os.path.dirname(os.path.dirname(os.path.abspath(suite.__file__))))' 2>/dev/null || true)"
# (and again when the `hfbench` script no longer starts, e.g. after its entry point moved)
if [[ "$here" != "$ROOT" ]] || ! "$VENV/bin/hfbench" --version >/dev/null 2>&1; then
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT"
fi
if [[ "$(readlink -f "$ROOT/.venv" 2>/dev/null)" != "$(readlink -f "$VENV")" ]]; then
  if [[ -L "$ROOT/.venv" || ! -e "$ROOT/.venv" ]]; then
    ln -sfn "$VENV" "$ROOT/.venv"
  else
    log "note: $ROOT/.venv is a real folder; using $VENV (set HFBENCH_VENV=$ROOT/.venv to use it instead)"
  fi
fi
# DeepSpeed JIT-compiles its CPU shared-memory comm op on first use (~1 min). Build it now,
# so no training task spends its first minute compiling (or is signalled in the middle of it).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/hfbench/torch_extensions}"
if [[ ! -f "$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/deepspeed_shm_comm.so" ]]; then
  log "building DeepSpeed's CPU comm op into $TORCH_EXTENSIONS_DIR (once, ~1 min)"
  "$(readlink -f "$VENV")/bin/python" -c 'from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load(verbose=False)' \
    >/dev/null 2>&1 || log "note: could not prebuild DeepSpeed's comm op; the first run will build it"
fi
log "ok: $VENV ($("$VENV/bin/hfbench" --help >/dev/null && echo 'hfbench works'))"
