#!/usr/bin/env bash
# CUDA build checks on a machine with no GPU (issue 8, SPEC 11-12). Each step prints its time.
#
#   bash .ci/cuda_checks.sh              1. CMake: the kernel library and the standalone test binary,
#                                           nvcc for sm_80 and sm_90a (skipped without nvcc), with
#                                           ptxas -v: registers per kernel printed, a spill in a
#                                           vocab-loop kernel fails
#                                        2. the pure wheel: builds, installs in a fresh venv with the
#                                           CPU torch, and a smoke subset of the tests passes from it
#   bash .ci/cuda_checks.sh --extension  3. also the platform wheel with lens_kernels._C, built against
#                                           the CUDA torch 2.14.1 in a separate venv, installed there,
#                                           imported, its ops registered (no driver: nothing runs).
#                                           Slow (torch 2.14.1 install + a 2-3 min build on 2 cores),
#                                           so it is opt-in.
#   bash .ci/cuda_checks.sh --extension-only   step 3 alone.
#
# Environment: CUDA_HOME (default: the directory above nvcc's bin/, or /usr/local/cuda),
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS (default 2), LENS_CI_WORK (scratch directory;
# default a fresh temporary one, removed at exit).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
EXTENSION=0
BASE=1
case "${1:-}" in
  --extension) EXTENSION=1 ;;
  --extension-only) EXTENSION=1; BASE=0 ;;
  "") ;;
  *) echo "usage: $0 [--extension | --extension-only]" >&2; exit 2 ;;
esac

WORK=${LENS_CI_WORK:-$(mktemp -d)}
[[ -z "${LENS_CI_WORK:-}" ]] && trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK"
export MAX_JOBS=${MAX_JOBS:-2}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
if [[ -z "${CUDA_HOME:-}" ]]; then
  if [[ -d /usr/local/cuda ]]; then CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")"); fi
fi
export CUDA_HOME

step() {
  local name=$1; shift
  local t0=$SECONDS
  echo "[cuda_checks] $name ..."
  "$@"
  echo "[cuda_checks] $name: ok in $((SECONDS - t0)) s"
}

cmake_build() {
  cmake -S "$ROOT" -B "$WORK/cmake" -G Ninja -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" -DLENS_PTXAS_VERBOSE=ON \
    >"$WORK/cmake.log"
  cmake --build "$WORK/cmake" -j "$MAX_JOBS" >>"$WORK/cmake.log" || { tail -50 "$WORK/cmake.log"; return 1; }
  test -x "$WORK/cmake/lens_kernels_test"
  # registers and spills per kernel (ptxas -v); a spill in a vocab-loop kernel is a local-memory
  # round trip per element: fail
  python3 "$ROOT/csrc/test/ptxas_report.py" --fail-on-spill '^(fused_loss|token_logprobs|rescale_grad)' \
    "$WORK/cmake.log"
  # the binary carries sm_80 and sm_90a machine code
  local cuobjdump
  cuobjdump=$(command -v cuobjdump || echo "$CUDA_HOME/bin/cuobjdump")
  if [[ ! -x "$cuobjdump" ]]; then  # the copy Triton ships, when the toolkit has none
    cuobjdump=$(python3 -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump'))" 2>/dev/null || true)
  fi
  if [[ -x "$cuobjdump" ]]; then
    local archs
    archs=$("$cuobjdump" --list-elf "$WORK/cmake/lens_kernels_test" 2>/dev/null || true)
    grep -q "sm_80" <<<"$archs" && grep -q "sm_90a" <<<"$archs"
  else
    echo "[cuda_checks] no cuobjdump: the embedded architectures are not listed"
  fi
}

pure_wheel() {
  rm -rf "$WORK/pure" && mkdir -p "$WORK/pure"
  LENS_KERNELS_BUILD_CUDA=0 python -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/pure/dist" "$ROOT"
  local wheel
  wheel=$(ls "$WORK"/pure/dist/lens_kernels-*-py3-none-any.whl)
  python -m venv "$WORK/pure/venv"
  "$WORK/pure/venv/bin/pip" install -q torch==2.13.0 "$wheel" pytest hypothesis
  # the tests run from outside the source tree, so that the installed wheel is what they import
  cp -r "$ROOT/tests" "$WORK/pure/tests"
  cd "$WORK/pure"
  "$WORK/pure/venv/bin/python" -c "
import lens_kernels as lk, os, sys
assert os.path.realpath(lk.__file__).startswith(os.path.realpath(sys.prefix)), lk.__file__
assert not lk.HAS_CUDA_EXT
print('pure wheel imports from', os.path.dirname(lk.__file__))"
  "$WORK/pure/venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_reference.py tests/test_dispatch.py \
    tests/test_errors.py tests/test_config.py
  cd "$ROOT"
}

extension_wheel() {
  local venv="$WORK/cudavenv"
  if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
    python -m venv "$venv"
    "$venv/bin/pip" install -q torch==2.14.1 numpy setuptools wheel ninja
  fi
  rm -rf "$WORK/ext" && mkdir -p "$WORK/ext"
  LENS_KERNELS_BUILD_CUDA=1 "$venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$WORK/ext/dist" "$ROOT"
  local wheel
  wheel=$(ls "$WORK"/ext/dist/lens_kernels-*-linux_*.whl)
  "$venv/bin/pip" install -q --no-deps --force-reinstall "$wheel"
  cd "$WORK/ext"
  "$venv/bin/python" -c "
import torch, lens_kernels as lk
from lens_kernels.backends import cuda
assert lk.HAS_CUDA_EXT and cuda.unavailable_reason() is None
ops = torch.ops.lens_kernels
for name in ('token_logprobs_fwd', 'token_logprobs_bwd', 'token_logprobs_bwd_', 'fused_policy_loss',
             'fused_policy_loss_', 'group_advantages', 'rescale_grad_', 'fused_loss_path', 'fused_loss_plan',
             'fused_loss_last_launch', 'set_debug_flags'):
    print(getattr(ops, name).default._schema)
assert cuda.last_fused_loss_launch() is None  # no launch yet; the plan query works without a device
print('plan without a device:', cuda.fused_loss_plan(151936, torch.bfloat16))
print('platform wheel', '$(basename "$wheel")', 'imports with the ops registered')"
  cd "$ROOT"
}

if [[ $BASE == 1 ]]; then
  if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
    step "cmake: kernels + test binary (sm_80, sm_90a)" cmake_build
  else
    echo "[cuda_checks] no CUDA toolkit: cmake step skipped"
  fi
  step "pure wheel: build, fresh venv, smoke tests" pure_wheel
fi
if [[ $EXTENSION == 1 ]]; then
  step "platform wheel with lens_kernels._C against torch 2.14.1" extension_wheel
fi
