#!/usr/bin/env bash
# CUDA build checks on a machine with no GPU. Each step prints its time.
#
#   bash .ci/cuda_checks.sh              1. CMake: the kernel library and the standalone test binary,
#                                           nvcc for sm_80 and sm_90a (skipped without nvcc), with
#                                           ptxas -v: registers per kernel printed, a spill in a
#                                           vocab-loop kernel fails
#                                        2. the pure wheel: builds, installs in a fresh venv with the
#                                           CPU torch, and a smoke subset of the tests passes from it
#   bash .ci/cuda_checks.sh --extension  3. also the platform wheel with lens_kernels._C, built against
#                                           the CUDA torch 2.14.1 in a venv of its own (no driver:
#                                           nothing runs on a GPU), installed there and imported; the
#                                           ops of both namespaces registered with the extension loaded
#                                           before and after the package (tests/test_cuda_extension_load.py);
#                                           the machine code and PTX of _C listed with cuobjdump: every
#                                           target of TORCH_CUDA_ARCH_LIST must be there. .ci/run runs it.
#   bash .ci/cuda_checks.sh --extension-only   step 3 alone.
#   bash .ci/cuda_checks.sh --extension-only --extension-torch 2.11.0
#                                        step 3 against another CUDA torch from the package index (opt-in,
#                                           not in .ci/run: a download of about 3 GB). 2.11.0 is the GPU
#                                           image's torch (CUDA 13.0 build).
#
# Environment: CUDA_HOME (default: the toolkit of the nvcc on PATH, else /usr/local/cuda),
# TORCH_CUDA_ARCH_LIST (default: setup.py's DEFAULT_CUDA_ARCH_LIST), MAX_JOBS (default 2), LENS_CI_WORK
# (scratch directory, reused between runs when given: the CUDA torch venv is kept there;
# default a fresh temporary one, removed at exit).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
EXTENSION=0
BASE=1
EXT_TORCH=2.14.1
while (($#)); do
  case "$1" in
    --extension) EXTENSION=1 ;;
    --extension-only) EXTENSION=1; BASE=0 ;;
    --extension-torch) EXT_TORCH=${2:?--extension-torch needs a version}; shift ;;
    *) echo "usage: $0 [--extension | --extension-only] [--extension-torch VERSION]" >&2; exit 2 ;;
  esac
  shift
done

WORK=${LENS_CI_WORK:-$(mktemp -d)}
[[ -z "${LENS_CI_WORK:-}" ]] && trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK"
export MAX_JOBS=${MAX_JOBS:-2}
# the targets setup.py builds when none are named: one list, read from setup.py
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(sed -n 's/^DEFAULT_CUDA_ARCH_LIST = "\(.*\)"$/\1/p' setup.py)}
export TORCH_CUDA_ARCH_LIST
# the toolkit nvcc runs from, also behind a wrapper script (csrc/test/cuda_home.sh); exported, so
# that torch's cpp_extension builds against the same one
source csrc/test/cuda_home.sh
CUDA_HOME=$(cuda_home || true)
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
  cuobjdump=$(find_cuobjdump python3 || true)
  if [[ -n "$cuobjdump" ]]; then
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

# The newest cuobjdump at hand: the toolkit's, or the copy Triton ships (in the build venv, given as $1, or
# in this python). An old one names sm_90a machine code "sm_90" (triton 3.6's, CUDA 12.8, does), so
# the newest wins.
find_cuobjdump() {
  local c best="" best_release=0 release py
  local candidates=("$(command -v cuobjdump || true)" "$CUDA_HOME/bin/cuobjdump")
  for py in "$1" python3; do
    candidates+=("$("$py" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump'))" 2>/dev/null || true)")
  done
  for c in "${candidates[@]}"; do
    [[ -n "$c" && -x "$c" ]] || continue
    release=$("$c" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1\2/p' | head -1)
    release=$((10#${release:-0}))
    if ((release > best_release)); then best=$c; best_release=$release; fi
  done
  [[ -n "$best" ]] && echo "$best"
}

extension_wheel() {
  local venv="$WORK/cudavenv-$EXT_TORCH"
  if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import torch; assert torch.version.cuda" 2>/dev/null; then
    python -m venv "$venv"
    "$venv/bin/python" -m pip install -q "torch==$EXT_TORCH" numpy setuptools wheel ninja pytest
  fi
  "$venv/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
  rm -rf "$WORK/ext" && mkdir -p "$WORK/ext"
  local t0=$SECONDS
  LENS_KERNELS_BUILD_CUDA=1 "$venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/ext/dist" "$ROOT"
  echo "[cuda_checks] platform wheel built in $((SECONDS - t0)) s (MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  local wheel
  wheel=$(ls "$WORK"/ext/dist/lens_kernels-*-linux_*.whl)
  "$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$wheel"
  # from outside the source tree, so that the installed wheel is what imports
  cp -r "$ROOT/tests" "$WORK/ext/tests"
  cd "$WORK/ext"
  "$venv/bin/python" -c "
import os, sys, torch, lens_kernels as lk
from lens_kernels.backends import cuda
assert os.path.realpath(lk.__file__).startswith(os.path.realpath(sys.prefix)), lk.__file__
assert lk.HAS_CUDA_EXT and cuda.unavailable_reason() is None, cuda.unavailable_reason()
assert cuda.last_fused_loss_launch() is None  # no launch yet; the plan query works without a device
print('plan without a device:', cuda.fused_loss_plan(151936, torch.bfloat16))
print('platform wheel', '$(basename "$wheel")', 'imports with the ops registered')"
  # the extension before and after the package, each in a fresh process: no duplicate registration
  LENS_REQUIRE_CUDA_EXT=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider -rs tests/test_cuda_extension_load.py
  local so
  so=$("$venv/bin/python" -c "import lens_kernels._C as c; print(c.__file__)")
  cd "$ROOT"
  check_targets "$so" "$(find_cuobjdump "$venv/bin/python")"
}

# Every target TORCH_CUDA_ARCH_LIST names is in the built library: "X.Y" or "X.Ya" as machine code
# (cuobjdump --list-elf: sm_XY / sm_XYa), "+PTX" also as PTX (--list-ptx).
check_targets() {
  local so=$1 cuobjdump=$2
  if [[ -z "$cuobjdump" ]]; then
    echo "[cuda_checks] no cuobjdump (neither the toolkit's nor Triton's): cannot list the targets of _C" >&2
    return 1
  fi
  echo "[cuda_checks] $cuobjdump: $("$cuobjdump" --version | grep -o 'release [0-9.]*')"
  local elf ptx missing=0
  elf=$("$cuobjdump" --list-elf "$so")
  ptx=$("$cuobjdump" --list-ptx "$so")
  echo "$elf" | sed 's/^/  elf: /'
  echo "$ptx" | sed 's/^/  ptx: /'
  local arch sm
  for arch in ${TORCH_CUDA_ARCH_LIST//;/ }; do
    sm="sm_$(tr -d . <<<"${arch%+PTX}")"
    grep -q "\.$sm\.cubin" <<<"$elf" || { echo "[cuda_checks] $arch: no $sm machine code in _C" >&2; missing=1; }
    if [[ "$arch" == *+PTX ]]; then
      grep -q "\.$sm\.ptx" <<<"$ptx" || { echo "[cuda_checks] $arch: no $sm PTX in _C" >&2; missing=1; }
    fi
  done
  return $missing
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
  step "platform wheel with lens_kernels._C against torch $EXT_TORCH" extension_wheel
fi
