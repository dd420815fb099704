#!/usr/bin/env bash
# The one GPU check of the benchmark suite, sized to finish in under 7 minutes on one H100/H200.
#
#   1. installs the peer wheels (Liger-Kernel, Cut-Cross-Entropy) from benchmarks/wheels/ if that
#      git-ignored folder holds any: the GPU machine has no internet. Fill it beforehand with
#        pip download --no-deps liger-kernel cut-cross-entropy -d benchmarks/wheels
#      (both are pure-Python wheels) and carry the folder to the machine;
#   2. runs the GPU tests (pytest -m gpu tests/, then the GPU cases of benchmarks/ once each);
#   3. runs lens-bench on the headline case with every provider and on a small grid (no
#      torch.compile there: its compile time is paid per shape), in one run; then the one-call LENS
#      step at its headline (ours, our bare loss, the Liger and eager two-stage baselines; its table
#      goes to the log only, to keep the file count); then our logits loss head once more with the
#      triton kernel's 2-pass split variant (LENS_KERNELS_TRITON_VARIANT=split; the default is row
#      until split has been measured);
#   (with LENS_DEVICE_CUDA=1 and nvcc on the machine, also csrc/test/device_check.sh: the CUDA
#   extension's test binary, GPU pytest and timing; a few minutes more)
#   4. writes its log, the JSON, the markdown and the plots to $OUT (default: lens_bench_out/; at most
#      7 files, as the device tool brings back 8), and prints a short table last.
#
# Without a CUDA GPU it degrades to a CPU dry run of the same steps (small shapes, torch providers),
# which is how it is tested off the GPU machine. Each step has its own time limit, and lens-bench
# writes its JSON after every case, so a step cut short still leaves its figures behind.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-lens_bench_out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
start=$SECONDS
step() { echo; echo "=== [$((SECONDS - start)) s] $*"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")

step "peer wheels"
shopt -s nullglob
wheels=(benchmarks/wheels/*.whl)
if ((${#wheels[@]})); then
  # --target keeps the machine's own torch/triton untouched; --no-deps: both wheels need only those.
  PEERS_DIR="$(mktemp -d)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PEERS_DIR" \
    "${wheels[@]}" && export PYTHONPATH="$PYTHONPATH:$PEERS_DIR"
  "$PY" -c "import importlib.metadata as m; [print(p, m.version(p)) for p in ('liger-kernel', 'cut-cross-entropy')]" \
    || echo "peer wheels did not import: their rows will say so"
else
  echo "no wheels in benchmarks/wheels/: the Liger and CCE rows will say 'unavailable'"
fi

LOSS_HEAD_PATHS=logits,logits-fwd,hidden,hidden-fwd,advantages
TESTS=$([[ -d tests ]] && echo tests/)  # the core's test folder; absent on a branch without tests
if [[ "$GPU" == 1 ]]; then
  step "GPU tests (tests/, marker gpu)"
  if [[ -n "$TESTS" ]]; then timeout 90 "$PY" -m pytest -m gpu tests/ -q -p no:cacheprovider 2>&1 | tail -15; fi
  step "benchmark cases, once each on the GPU (benchmarks/, marker gpu)"
  timeout 50 "$PY" -m pytest -m gpu benchmarks/ -q -p no:cacheprovider --benchmark-disable 2>&1 | tail -15
  step "lens-bench --quick: the headline with every provider, then a small grid without compile"
  timeout 165 "$PY" -m lens_kernels.bench --quick --grid-exclude compile --paths "$LOSS_HEAD_PATHS" --out "$OUT" \
    2>&1 | tail -100
  step "the one-call LENS step at its headline (N=16384, V=151936, bf16, on-policy, G=8)"
  timeout 55 "$PY" -m lens_kernels.bench --headline --paths lens-step --no-files 2>&1 | tail -40
  step "the triton loss head's split variant at the headline (the 2-pass design; opt-in until measured)"
  LENS_KERNELS_TRITON_VARIANT=split timeout 40 "$PY" -m lens_kernels.bench --headline --paths logits \
    --providers ours --no-files 2>&1 | grep -E "^(==|provider|ours-)|failed|unavailable"
  if [[ "${LENS_DEVICE_CUDA:-0}" == 1 ]] && command -v nvcc >/dev/null; then
    # opt-in (it builds the extension: a few minutes): the CUDA kernels' test binary, their GPU pytest
    # and their timing at the headline; logs go to this script's log only
    step "CUDA extension (LENS_DEVICE_CUDA=1): test binary, GPU pytest, headline timing"
    OUT="$(mktemp -d)" timeout 240 bash csrc/test/device_check.sh 2>&1 | tail -60
  fi
else
  step "no CUDA GPU: CPU dry run of the same steps"
  timeout 120 "$PY" -m pytest -m gpu $TESTS benchmarks/ -q -p no:cacheprovider --benchmark-disable 2>&1 | tail -3
  timeout 150 "$PY" -m lens_kernels.bench --quick --exclude compile --rep-ms 10 --out "$OUT" 2>&1 | tail -5
fi

step "short table"
for f in "$OUT"/lens-bench_*.json; do
  echo "--- $f"
  "$PY" -m lens_kernels.bench --summary "$f"
done
echo "device_check: $((SECONDS - start)) s"
