#!/usr/bin/env bash
# The one GPU check of the project, for one call of at most 10 minutes on one H100 or H200 (machine
# start not counted), from a cold Triton cache, with the CUDA extension and both peers. Each step has
# its own time limit (timeout -k); their sum, the CUDA step included, is 420 s. Correctness comes before
# timing, the compile-heavy rows come last, and a step cut short loses only its own figures (lens-bench
# writes its JSON after every case).
#
#   step                                                         limit   writes
#   1. environment (nvidia-smi 5 s; versions and the GPU, 15 s)    20 s   log
#   2. peer wheels (Liger-Kernel, Cut-Cross-Entropy) from          10 s   log
#      benchmarks/wheels/ (git-ignored; the GPU machine has no internet, so they travel only when named):
#        pip download --no-deps liger-kernel cut-cross-entropy -d benchmarks/wheels
#      and pass carry: ["benchmarks/wheels"] to the device tool. Missing: an ERROR line opens the log.
#   3. GPU tests (marker gpu), each test under LENS_TEST_TIMEOUT (default 30), -rfE --tb=line; the
#      whole pytest output of every GPU step in pytest_gpu.log:
#      a. the core loss-head tests (tests/gpu/), except the split   60 s   pytest_gpu.log
#         variant's
#      b. the other GPU tests of tests/ (not split, not the CUDA     30 s   pytest_gpu.log
#         extension's)
#   4. benchmark cases once each (benchmarks/, gpu), but the       20 s   log
#      compile-heavy ones
#   5. lens-bench --headline: logits, logits-fwd, hidden-fwd,      70 s   JSON + md
#      LENS advantages and the one-call LENS step, every provider but torch.compile, 3 rounds
#   6. LENS_DEVICE_CUDA=1 (and a CUDA toolkit): csrc/test/device_check.sh, the CUDA extension: test
#      binary and extension build side by side, its GPU tests, timing, then compute-sanitizer (15 s a
#      tool) for as long as the limit leaves room
#                                                                 115 s   log, pytest_gpu.log
#   7. the triton loss head's 2-pass split variant (LENS_KERNELS_TRITON_VARIANT=split; opt-in until
#      measured), after the results it could take with it in a hang:
#      a. its GPU tests (-k split)                                 15 s   pytest_gpu.log
#      b. lens-bench --headline --paths logits with ours-triton-row 30 s   JSON + md
#         and ours-triton-split as rows of one run, beside Liger and eager
#   8. last, the compile-heavy rows: each pays a compile in its first call
#      a. the benchmark cases of torch.compile and Liger's hidden  15 s   log
#         path (LigerFusedLinearGRPOLoss, compiled=True by default)
#      b. lens-bench --headline --paths hidden, every provider      30 s   JSON + md
#         (ours, eager, Liger compiled, CCE, torch.compile)
#   9. the short table of every JSON, printed last                  5 s   stdout
#
# $OUT (default lens_bench_out/) gets the log, pytest_gpu.log, 3 JSON and 3 markdown files: 8 flat files.
# Nothing here uses the Triton interpreter (TRITON_INTERPRET is unset: numpy >= 2.4 breaks triton 3.6's).
# Without a CUDA GPU it runs a CPU dry run of the same steps (small shapes via --shape, torch
# providers, the GPU tests collected and skipped), which is how it is tested off the GPU machine
# (benchmarks/test_device_check.py) and rehearsed under the GPU image's versions
# (benchmarks/rehearse_device_check.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-lens_bench_out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"
PYTEST_LOG="$OUT/pytest_gpu.log"
: >"$PYTEST_LOG"
start=$SECONDS

shopt -s nullglob
wheels=(benchmarks/wheels/*.whl)
liger=(benchmarks/wheels/liger_kernel-*.whl)
cce=(benchmarks/wheels/cut_cross_entropy-*.whl)
if ((${#liger[@]} == 0 || ${#cce[@]} == 0)); then
  echo "ERROR: peer wheels missing from benchmarks/wheels/ (liger-kernel: ${#liger[@]}, cut-cross-entropy:" \
    "${#cce[@]}): their rows will say 'unavailable'. Bring them: pip download --no-deps liger-kernel" \
    "cut-cross-entropy -d benchmarks/wheels, then pass carry: [\"benchmarks/wheels\"] to the device tool."
fi

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
# gpu_tests LIMIT ARGS...: pytest -m gpu, each test under LENS_TEST_TIMEOUT; every line to pytest_gpu.log,
# the failures (one line each) and the counts to this log
gpu_tests() {
  local s=$1; shift
  echo "--- pytest -m gpu $*" >>"$PYTEST_LOG"
  LENS_TEST_TIMEOUT="${LENS_TEST_TIMEOUT:-30}" limit "$s" "${PYTEST[@]}" -rfE --tb=line "$@" 2>&1 | tee -a "$PYTEST_LOG" |
    grep -E "^(FAILED|ERROR)|passed|failed|skipped|error|Timeout|step cut" | tail -40
}

step "environment (limit 20 s)"
if ! limit 5 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,power.draw,temperature.gpu \
  --format=csv,noheader 2>/dev/null; then
  echo "no nvidia-smi"
  LIMIT_SCALE=${LIMIT_SCALE_DRY:-5}  # no GPU machine: the dry run's limits from here on
fi
# the last line says whether torch sees a GPU (0 when the import fails or hangs)
INFO=$(limit 15 "$PY" -c "import torch, triton, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'numpy', numpy.__version__); print(int(torch.cuda.is_available()))" 2>&1) || INFO+=$'\n0'
echo "${INFO%$'\n'*}"
GPU=${INFO##*$'\n'}

step "peer wheels (limit 10 s)"
if ((${#wheels[@]})); then
  # --target keeps the machine's own torch/triton untouched; --no-deps: both wheels need only those.
  PEERS_DIR="$(mktemp -d)"
  limit 10 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PEERS_DIR" \
    "${wheels[@]}" && export PYTHONPATH="$PYTHONPATH:$PEERS_DIR"
  "$PY" -c "import importlib.metadata as m; [print(p, m.version(p)) for p in ('liger-kernel', 'cut-cross-entropy')]" \
    || echo "peer wheels did not import: their rows will say so"
else
  echo "no wheels in benchmarks/wheels/ (see the ERROR line at the top)"
fi

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -m gpu)
# the benchmark cases that pay a compile in their first call: torch.compile, and Liger's hidden path
COMPILE_HEAVY="compile or (hidden and liger)"
if [[ "$GPU" == 1 ]]; then
  CORE_TESTS=$([[ -d tests/gpu ]] && echo tests/gpu/)  # absent on a branch without the core's tests
  OTHER_TESTS=$([[ -d tests ]] && echo tests/)
  HEADLINE=(--headline)
  SPLIT_PROVIDERS=ours-triton-row,ours-triton-split,liger,eager
  HIDDEN_EXCLUDE=()
else
  # CPU dry run: the GPU tests are collected and skipped; small shapes stand for the headline.
  LIMIT_SCALE=${LIMIT_SCALE_DRY:-5}
  CORE_TESTS=$([[ -d tests/gpu ]] && echo tests/gpu/)
  OTHER_TESTS=""
  HEADLINE=(--shape "${DRY_SHAPE:-4x32x1001x64}" --rep-ms 2 --warmup-ms 0)
  SPLIT_PROVIDERS=ours-triton-row,ours-triton-split,liger,eager,ours-torch
  HIDDEN_EXCLUDE=(--exclude compile)  # inductor's C++ build on the CPU: minutes, and no GPU figure
  echo "no CUDA GPU: CPU dry run of the same steps (shape ${HEADLINE[1]}, torch providers)"
fi

step "GPU tests: the core loss-head tests, except the split variant's (limit 60 s)"
if [[ -n "$CORE_TESTS" ]]; then gpu_tests 60 "$CORE_TESTS" -k "not split"; fi
step "GPU tests: the others, except the split variant's and the CUDA extension's (limit 30 s)"
if [[ -n "$OTHER_TESTS" ]]; then
  gpu_tests 30 "$OTHER_TESTS" --ignore=tests/gpu --ignore=tests/test_cuda_gpu.py -k "not split"
fi

step "benchmark cases once each (benchmarks/, marker gpu), but the compile-heavy ones (limit 20 s)"
limit 20 "${PYTEST[@]}" benchmarks/ --benchmark-disable -rfE --tb=line -k "not ($COMPILE_HEAVY)" 2>&1 | tail -8

step "lens-bench: the headline, logits, hidden forward, LENS advantages and step, every provider but compile (limit 70 s)"
limit 70 "$PY" -m lens_kernels.bench "${HEADLINE[@]}" --paths logits,logits-fwd,hidden-fwd,advantages,lens-step \
  --exclude compile --out "$OUT" 2>&1 | tail -60

if [[ "$GPU" == 1 && "${LENS_DEVICE_CUDA:-0}" == 1 ]]; then
  step "CUDA extension (LENS_DEVICE_CUDA=1): csrc/test/device_check.sh (limit 115 s)"
  # its own files stay in a temporary folder (8 files come back): its output is in this log, its GPU
  # tests in pytest_gpu.log; the sanitizer runs last, each tool only if it ends within 110 s
  PYTHON="$PY" PYTEST_LOG="$PYTEST_LOG" LENS_SANITIZER_TIMEOUT="${LENS_SANITIZER_TIMEOUT:-15}" LENS_CUDA_BUDGET=110 \
    OUT="$(mktemp -d)" limit 115 bash csrc/test/device_check.sh 2>&1 | tail -60
fi

step "split variant: its GPU tests (-k split; limit 15 s)"
if [[ -n "$CORE_TESTS" ]]; then LENS_KERNELS_TRITON_VARIANT=split gpu_tests 15 "$CORE_TESTS" -k split; fi
step "split variant: row and split as rows of one run, beside Liger (limit 30 s)"
limit 30 "$PY" -m lens_kernels.bench "${HEADLINE[@]}" --paths logits --providers "$SPLIT_PROVIDERS" --out "$OUT" \
  2>&1 | tail -30

step "last, compile-heavy: the benchmark cases of torch.compile and Liger's hidden path (limit 15 s)"
limit 15 "${PYTEST[@]}" benchmarks/ --benchmark-disable -rfE --tb=line -k "$COMPILE_HEAVY" 2>&1 | tail -8
step "last, compile-heavy: the hidden path at its headline, every provider (limit 30 s)"
limit 30 "$PY" -m lens_kernels.bench "${HEADLINE[@]}" --paths hidden "${HIDDEN_EXCLUDE[@]}" --out "$OUT" 2>&1 | tail -30

step "short table"
limit 5 "$PY" -m lens_kernels.bench --summary "$OUT"/lens-bench_*.json
echo "device_check: $((SECONDS - start)) s (step limits 420 s)"
