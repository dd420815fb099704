#!/usr/bin/env bash
# The one GPU check of the benchmark suite: under 6 minutes on one H200 (machine start not counted), so
# that it runs twice within a 15-minute GPU budget. Each step has its own time limit (timeout -k), sized
# below; their sum is 350 s. A step cut short loses only its own figures: lens-bench writes its JSON
# after every case.
#
#   step                                                        limit   writes
#   1. environment (nvidia-smi, versions)                          10 s   log
#   2. peer wheels (Liger-Kernel, Cut-Cross-Entropy) from          20 s   log
#      benchmarks/wheels/ (git-ignored; the GPU machine has no internet). Fill it beforehand with
#        pip download --no-deps liger-kernel cut-cross-entropy -d benchmarks/wheels
#   3. GPU tests, marker gpu, except the split variant's           60 s   log
#   4. benchmark cases once each on the GPU (benchmarks/, gpu)     30 s   log
#   5. lens-bench --headline: the loss-head paths and LENS        110 s   JSON + md
#      advantages, every provider but torch.compile (its compile is paid per shape), 3 rounds
#   6. lens-bench --headline --paths lens-step: the one-call        40 s   JSON + md
#      LENS step, our bare loss, the Liger and eager two-stage baselines
#   (LENS_DEVICE_CUDA=1 and nvcc: csrc/test/device_check.sh, the CUDA extension's test binary, GPU
#    pytest, compute-sanitizer and timing: its own limit, LENS_DEVICE_CUDA_LIMIT s (default 420: test binary, extension build, GPU pytest, timing, then the sanitizer at 40 s a tool), on top
#    of the 6 minutes)
#   7. last, as a hang there must not take the other results: the triton loss head's 2-pass split
#      variant (LENS_KERNELS_TRITON_VARIANT=split; opt-in until measured):
#      a. its GPU tests (-k split)                                 25 s   log
#      b. lens-bench --headline --paths logits with ours-triton-row 45 s   JSON + md
#         and ours-triton-split as rows of one run, beside Liger and eager
#   8. the short table of every JSON, printed last                 10 s   stdout
#
# $OUT (default lens_bench_out/) gets the log, 3 JSON and 3 markdown files: 7 files at most.
# Without a CUDA GPU it runs a CPU dry run of the same steps (small shapes via --shape, torch
# providers, the GPU tests collected and skipped), which is how it is tested off the GPU machine
# (benchmarks/test_device_check.py).
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
# limit SECONDS command...: the command's own time limit; TERM first, KILL 5 s later (a GPU hang). The
# CPU dry run stretches every limit by LIMIT_SCALE (5): there they guard against hangs, not the budget.
LIMIT_SCALE=1
limit() {
  local s=$(($1 * LIMIT_SCALE)); shift
  timeout -k 5 "$s" "$@"; local rc=$?
  ((rc == 124 || rc == 137)) && echo "(step cut at its ${s} s limit)"
  return $rc
}

step "environment (limit 10 s)"
limit 5 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,power.draw,temperature.gpu \
  --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
GPU=$(timeout -k 5 30 "$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"

step "peer wheels (limit 20 s)"
shopt -s nullglob
wheels=(benchmarks/wheels/*.whl)
if ((${#wheels[@]})); then
  # --target keeps the machine's own torch/triton untouched; --no-deps: both wheels need only those.
  PEERS_DIR="$(mktemp -d)"
  limit 20 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PEERS_DIR" \
    "${wheels[@]}" && export PYTHONPATH="$PYTHONPATH:$PEERS_DIR"
  "$PY" -c "import importlib.metadata as m; [print(p, m.version(p)) for p in ('liger-kernel', 'cut-cross-entropy')]" \
    || echo "peer wheels did not import: their rows will say so"
else
  echo "no wheels in benchmarks/wheels/: the Liger and CCE rows will say 'unavailable'"
fi

LOSS_HEAD_PATHS=logits,logits-fwd,hidden,hidden-fwd,advantages
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -m gpu)
if [[ "$GPU" == 1 ]]; then
  TESTS=$([[ -d tests ]] && echo tests/)  # the core's test folder; absent on a branch without tests
  HEADLINE=(--headline)
  SPLIT_PROVIDERS=ours-triton-row,ours-triton-split,liger,eager
else
  # CPU dry run: the GPU tests are collected and skipped; small shapes stand for the headline.
  LIMIT_SCALE=${LIMIT_SCALE_DRY:-5}
  TESTS=$([[ -d tests/gpu ]] && echo tests/gpu/)
  HEADLINE=(--shape "${DRY_SHAPE:-4x32x1001x64}" --rep-ms 2 --warmup-ms 0)
  SPLIT_PROVIDERS=ours-triton-row,ours-triton-split,liger,eager,ours-torch
  echo "no CUDA GPU: CPU dry run of the same steps (shape ${HEADLINE[1]}, torch providers)"
fi

step "GPU tests, marker gpu, except the split variant's (limit 60 s)"
if [[ -n "$TESTS" ]]; then limit 60 "${PYTEST[@]}" "$TESTS" -k "not split" 2>&1 | tail -15; fi

step "benchmark cases once each (benchmarks/, marker gpu; limit 30 s)"
limit 30 "${PYTEST[@]}" benchmarks/ --benchmark-disable 2>&1 | tail -8

step "lens-bench: the headline, loss-head paths and LENS advantages, every provider but compile (limit 110 s)"
limit 110 "$PY" -m lens_kernels.bench "${HEADLINE[@]}" --paths "$LOSS_HEAD_PATHS" --exclude compile --out "$OUT" \
  2>&1 | tail -80

step "lens-bench: the one-call LENS step at its headline (on-policy, G=8; limit 40 s)"
limit 40 "$PY" -m lens_kernels.bench "${HEADLINE[@]}" --paths lens-step --out "$OUT" 2>&1 | tail -30

if [[ "$GPU" == 1 && "${LENS_DEVICE_CUDA:-0}" == 1 ]] && command -v nvcc >/dev/null; then
  # opt-in (it builds the extension): on top of the 6 minutes, with its own limit; logs to this log only
  step "CUDA extension (LENS_DEVICE_CUDA=1): csrc/test/device_check.sh (limit ${LENS_DEVICE_CUDA_LIMIT:-420} s)"
  LENS_SANITIZER_TIMEOUT="${LENS_SANITIZER_TIMEOUT:-40}" OUT="$(mktemp -d)" limit "${LENS_DEVICE_CUDA_LIMIT:-420}" bash csrc/test/device_check.sh 2>&1 | tail -60
fi

step "last: the triton loss head's split variant, tests (-k split; limit 25 s)"
if [[ -n "$TESTS" ]]; then
  LENS_KERNELS_TRITON_VARIANT=split limit 25 "${PYTEST[@]}" "$TESTS" -k split 2>&1 | tail -10
fi
step "last: row and split variants as rows of one run, beside Liger (limit 45 s)"
limit 45 "$PY" -m lens_kernels.bench "${HEADLINE[@]}" --paths logits --providers "$SPLIT_PROVIDERS" --out "$OUT" \
  2>&1 | tail -30

step "short table"
limit 10 "$PY" -m lens_kernels.bench --summary "$OUT"/lens-bench_*.json
echo "device_check: $((SECONDS - start)) s (budget 350 s)"
