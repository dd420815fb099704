#!/usr/bin/env bash
# The rehearsal before any GPU run: benchmarks/device_check.sh as a CPU dry run under the GPU image's
# own versions, in a venv built from the package index: Python 3.12, torch 2.11.0 (its CUDA 13.0 build,
# as on the image), triton 3.6.0, the newest numpy 2.x (the image has 2.5; numpy >= 2.4 breaks triton
# 3.6's interpreter, so nothing in the device check may use it), pytest, pytest-benchmark, hypothesis,
# matplotlib, tqdm. No GPU needed. What it catches before a GPU call is spent: an import, collection or
# CLI error under those versions, a step over its limit, a missing output file.
#
#   bash benchmarks/rehearse_device_check.sh
#
# The first run builds the venv (a download of about 3 GB); later runs reuse it. Environment:
# REHEARSAL_PYTHON (a Python 3.12; default python3.12 on PATH, else pyenv's newest 3.12), REHEARSAL_VENV
# (default ~/.cache/lens_kernels/rehearsal-py3.12-torch2.11.0), OUT (the dry run's files; default a
# temporary directory). Exit status: the dry run's, or 1 when its log shows a cut step or a missing file.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.11.0
TRITON_VERSION=3.6.0
VENV=${REHEARSAL_VENV:-$HOME/.cache/lens_kernels/rehearsal-py3.12-torch$TORCH_VERSION}
start=$SECONDS

is_312() { [[ -n "$1" ]] && "$1" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; }
py=${REHEARSAL_PYTHON:-}
if [[ -z "$py" ]]; then
  # a pyenv shim on PATH answers only where pyenv activates that version: try the version's own binary too
  for c in "$(command -v python3.12 || true)" \
           $(command -v pyenv >/dev/null && ls -d "$(pyenv root)"/versions/3.12*/bin/python 2>/dev/null | sort -rV); do
    if is_312 "$c"; then py=$c; break; fi
  done
fi
is_312 "$py" || { echo "ERROR: no Python 3.12 (set REHEARSAL_PYTHON)" >&2; exit 2; }

want() {  # the venv has the image's versions
  "$VENV/bin/python" - "$TORCH_VERSION" "$TRITON_VERSION" <<'EOF' 2>/dev/null
import sys, numpy, torch, triton
assert sys.version_info[:2] == (3, 12), sys.version
assert torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda and torch.version.cuda.startswith("13"), \
    (torch.__version__, torch.version.cuda)
assert triton.__version__ == sys.argv[2] and numpy.__version__.startswith("2."), (triton.__version__, numpy.__version__)
import pytest, pytest_benchmark, hypothesis, matplotlib, tqdm
EOF
}

if ! want; then
  echo "[rehearsal] building $VENV with $("$py" --version)"
  rm -rf "$VENV"
  "$py" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first with its own triton pin, then triton and numpy at the image's versions
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" "numpy>=2.4,<3" \
    pytest pytest-benchmark hypothesis matplotlib tqdm
  want || { echo "ERROR: the venv does not have the GPU image's versions" >&2; exit 1; }
  echo "[rehearsal] venv built in $((SECONDS - start)) s"
fi
"$VENV/bin/python" -c "import sys, torch, triton, numpy; print('[rehearsal] python', sys.version.split()[0], 'torch', \
torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'numpy', numpy.__version__)"

OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
t0=$SECONDS
rc=0
# the image has no GPU visible here: device_check.sh runs its CPU dry run
CUDA_VISIBLE_DEVICES="" PYTHON="$VENV/bin/python" OUT="$OUT" bash benchmarks/device_check.sh || rc=$?
echo "[rehearsal] dry run: rc=$rc in $((SECONDS - t0)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
log="$OUT/device_check.log"
if ((rc == 0)); then
  if grep -q "step cut" "$log"; then echo "ERROR: a step was cut at its limit" >&2; rc=1; fi
  if (($(ls "$OUT" | wc -l) > 8)); then echo "ERROR: more than 8 files under OUT" >&2; rc=1; fi
  if (($(ls "$OUT"/*.json 2>/dev/null | wc -l) != 3)); then echo "ERROR: not 3 lens-bench JSON files" >&2; rc=1; fi
fi
echo "[rehearsal] total $((SECONDS - start)) s, rc=$rc"
exit $rc
