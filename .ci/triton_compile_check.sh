#!/usr/bin/env bash
# The static compile check of the Triton kernels (tests/test_triton_compile.py: every launch the
# launchers make, compiled for sm_90 and sm_80 without a GPU, held to no spill and to the register
# budgets of that Triton version) against a chosen Triton release, in a venv of its own:
#
#   bash .ci/triton_compile_check.sh 3.6.0     the GPU image's Triton (opt-in; CI runs the check
#                                              with the Triton of its own environment)
#
# The venv (the CPU torch, that triton, numpy, pytest) is kept in .venv/triton-VERSION and reused.
# Time on 2 shared cores: see benchmarks/NOTES.md ("Static check under another Triton").
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${1:?usage: $0 TRITON_VERSION (e.g. 3.6.0)}"
VENV=".venv/triton-$VERSION"
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q "triton==$VERSION" torch==2.13.0 numpy pytest
echo "venv ready: $(( $(date +%s) - start )) s ($("$VENV/bin/python" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'))"
# the check skips on a Triton whose JIT internals it does not drive: here that is a failure
PYTHONPATH="$(pwd)" "$VENV/bin/python" -m pytest -q -rs tests/test_triton_compile.py | tee "$VENV/check.log"
if grep -q "skipped" "$VENV/check.log"; then
  echo "triton $VERSION: the check skipped (see the reason above)" >&2
  exit 1
fi
echo "triton $VERSION static compile check: $(( $(date +%s) - start )) s in all"
