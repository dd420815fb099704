#!/usr/bin/env bash
# The CUDA kernels on a GPU machine, in one call (for benchmarks/device_check.sh or by hand):
#   1. the extension built in place against the machine's torch, in the background from the start
#      (the torch headers make it the long pole), while
#   2. CMake builds the standalone test binary and runs it (float64 CPU reference, every variant the
#      device runs);
#   3. the GPU pytest of the backend (tests/test_cuda_gpu.py), each test under LENS_TEST_TIMEOUT
#      (default 30 s), its whole output appended to PYTEST_LOG (default $OUT/pytest_gpu.log);
#   4. a timing of the fused loss variants (auto first, with the plan it ran: path and CTAs per
#      cluster) at the headline shape (N=16384, V=151936, bf16) against a device-to-device copy, as
#      bandwidth over the 2-pass byte count;
#   5. compute-sanitizer memcheck, racecheck and synccheck on the test binary's small shapes
#      (lens_kernels_test --small), each under LENS_SANITIZER_TIMEOUT seconds (default 60); last, so
#      that a caller's time limit cuts it before the timing; a tool that would end past LENS_CUDA_BUDGET
#      seconds from the start (when set) is skipped. LENS_SANITIZER=0 skips them all.
# The toolkit: CUDA_HOME, else the one the nvcc on PATH runs from (csrc/test/cuda_home.sh), exported so
# that torch builds against it too. Targets: TORCH_CUDA_ARCH_LIST, default 9.0a (this machine's Hopper).
# Writes logs under $OUT when set. Run from the repository root. Exit status: the test binary's, or 1
# when a build fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$(mktemp -d)}
PYTEST_LOG=${PYTEST_LOG:-$OUT/pytest_gpu.log}
export MAX_JOBS=${MAX_JOBS:-8} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"9.0a"}
source csrc/test/cuda_home.sh
CUDA_HOME=$(cuda_home) || { echo "[device_check] no CUDA toolkit (set CUDA_HOME)"; exit 1; }
export CUDA_HOME
PY=${PYTHON:-python3}
echo "[device_check] CUDA_HOME=$CUDA_HOME, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"

t_ext=$SECONDS
LENS_KERNELS_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace >"$OUT/build_ext.log" 2>&1 &
ext_pid=$!
trap 'kill "$ext_pid" 2>/dev/null || true' EXIT  # when a cmake step fails first

t0=$SECONDS
cmake -S . -B build/cmake -G Ninja -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" \
  -DLENS_CUDA_GENCODE="-gencode=arch=compute_90a,code=sm_90a" >"$OUT/cmake.log" 2>&1 || { tail -40 "$OUT/cmake.log"; exit 1; }
cmake --build build/cmake -j "$MAX_JOBS" >>"$OUT/cmake.log" 2>&1 || { tail -40 "$OUT/cmake.log"; exit 1; }
test_rc=0
build/cmake/lens_kernels_test >"$OUT/lens_kernels_test.log" 2>&1 || test_rc=$?
grep -E "FAIL|ran |PASSED|FAILED" "$OUT/lens_kernels_test.log" | sort | uniq -c | sort -rn | head -30
echo "[device_check] test binary: rc=$test_rc, $((SECONDS - t0)) s"

wait "$ext_pid" || { tail -40 "$OUT/build_ext.log"; exit 1; }
echo "[device_check] extension built: $((SECONDS - t_ext)) s from the start"
t0=$SECONDS
# a failing test must not cut the timing and the sanitizer: its status is printed
echo "--- pytest -m gpu tests/test_cuda_gpu.py (the CUDA extension)" >>"$PYTEST_LOG"
LENS_TEST_TIMEOUT="${LENS_TEST_TIMEOUT:-30}" "$PY" -m pytest -q -p no:cacheprovider -m gpu -rfE --tb=line \
  tests/test_cuda_gpu.py 2>&1 | tee -a "$PYTEST_LOG" | grep -E "^(FAILED|ERROR)|passed|failed|error|Timeout" |
  tail -30 || echo "[device_check] GPU pytest failed"
echo "[device_check] GPU pytest: $((SECONDS - t0)) s"

"$PY" - <<'EOF' 2>&1 | tee "$OUT/timing.log" || echo "[device_check] timing failed"
# bytes of the 2-pass floor: read the logits once, write the gradient once
import torch, triton.testing as tt
import lens_kernels as lk
from lens_kernels.backends import cuda as cb
N, V = 16384, 151936
logits = torch.randn(1, N, V, device="cuda", dtype=torch.bfloat16)
targets = torch.randint(0, V, (1, N), device="cuda")
mask = torch.ones(1, N, dtype=torch.bool, device="cuda")
adv = torch.randn(1, device="cuda")
copy_dst = torch.empty_like(logits)
ms_copy = tt.do_bench(lambda: copy_dst.copy_(logits), warmup=25, rep=200, return_mode="median")
bw = 2 * logits.numel() * 2 / ms_copy / 1e9
print(f"copy: {ms_copy:.3f} ms, {bw:.2f} TB/s (read + write)")
x = logits.requires_grad_(True)
for path in ("auto", "stream", "smem_row", "cluster"):
    plan = cb.fused_loss_plan(V, torch.bfloat16, path, rows=N)
    if path != "auto" and plan["path"] != path:
        print(f"fused loss {path}: not runnable at V={V}")
        continue
    print(f"fused loss {path}: plan {plan}")
    def step():
        loss, _ = cb.policy_loss_from_logits(x, targets, mask, adv, path=path)
        loss.backward()
        x.grad = None
    ms = tt.do_bench(step, warmup=25, rep=200, return_mode="median")
    assert cb.last_fused_loss_launch() == plan, (cb.last_fused_loss_launch(), plan)
    print(f"fused loss fwd+bwd {path}: {ms:.3f} ms = {2 * logits.numel() * 2 / ms / 1e9:.2f} TB/s over 2 passes "
          f"({ms_copy / ms:.0%} of copy)")
t, keep = targets.reshape(-1), mask.reshape(-1)
ms = tt.do_bench(lambda: torch.ops.lens_kernels_cuda.token_logprobs_fwd(logits.detach(), t, keep, None, 1.0),
                 warmup=25, rep=200, return_mode="median")
print(f"log-probs fwd: {ms:.3f} ms = {logits.numel() * 2 / ms / 1e9:.2f} TB/s over 1 pass ({ms_copy / 2 / ms:.0%} of copy)")
EOF

if [[ "${LENS_SANITIZER:-1}" == 1 ]]; then
  CS=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  if [[ -x "$CS" ]]; then
    sanitizer_s=${LENS_SANITIZER_TIMEOUT:-60}
    for tool in memcheck racecheck synccheck; do
      # a caller's limit (LENS_CUDA_BUDGET seconds from the start): a tool that cannot finish within
      # it is skipped and said so, rather than cut with no verdict
      if ((${LENS_CUDA_BUDGET:-0} > 0 && SECONDS + sanitizer_s > ${LENS_CUDA_BUDGET:-0})); then
        echo "[device_check] compute-sanitizer $tool: skipped, ${sanitizer_s} s would pass the ${LENS_CUDA_BUDGET} s budget"
        continue
      fi
      t0=$SECONDS
      rc=0
      timeout "$sanitizer_s" "$CS" --tool "$tool" --error-exitcode 3 \
        build/cmake/lens_kernels_test --small >"$OUT/sanitizer_$tool.log" 2>&1 || rc=$?
      # rc 3: the tool found errors; 1: a check failed; 124: out of time (no verdict)
      echo "[device_check] compute-sanitizer $tool: rc=$rc, $((SECONDS - t0)) s"
      grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Race|Barrier|FAIL" "$OUT/sanitizer_$tool.log" | head -8
    done
  else
    echo "[device_check] no compute-sanitizer: sanitizer step skipped"
  fi
fi
exit "$test_rc"
