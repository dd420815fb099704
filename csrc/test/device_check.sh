#!/usr/bin/env bash
# The CUDA kernels on a GPU machine, in one call (for benchmarks/device_check.sh or by hand):
#   1. CMake build + the standalone test binary (float64 CPU reference, every variant the device runs);
#   2. the extension built in place against the machine's torch, and the GPU pytest of the backend;
#   3. a timing of the fused loss variants (auto first, with the plan it ran: path and CTAs per
#      cluster) at the headline shape (N=16384, V=151936, bf16) against a device-to-device copy, as
#      bandwidth over the 2-pass byte count;
#   4. compute-sanitizer memcheck, racecheck and synccheck on the test binary's small shapes
#      (lens_kernels_test --small), each under LENS_SANITIZER_TIMEOUT seconds (default 60); last, so
#      that a caller's time limit cuts it before the timing. LENS_SANITIZER=0 skips it.
# Writes logs under $OUT when set. Run from the repository root. Exit status: the test binary's.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$(mktemp -d)}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"9.0"}
CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
export CUDA_HOME

t0=$SECONDS
cmake -S . -B build/cmake -G Ninja -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" \
  -DLENS_CUDA_GENCODE="-gencode=arch=compute_90a,code=sm_90a" >"$OUT/cmake.log" 2>&1
cmake --build build/cmake >>"$OUT/cmake.log" 2>&1
test_rc=0
build/cmake/lens_kernels_test >"$OUT/lens_kernels_test.log" 2>&1 || test_rc=$?
grep -E "FAIL|ran |PASSED|FAILED" "$OUT/lens_kernels_test.log" | sort | uniq -c | sort -rn | head -30
echo "[device_check] test binary: rc=$test_rc, $((SECONDS - t0)) s"

t0=$SECONDS
LENS_KERNELS_BUILD_CUDA=1 python3 setup.py build_ext --inplace >"$OUT/build_ext.log" 2>&1 || {
  tail -40 "$OUT/build_ext.log"; exit 1; }
# a failing test must not cut the timing and the sanitizer: its status is printed
python3 -m pytest -q -m gpu tests/test_cuda_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15 ||
  echo "[device_check] GPU pytest failed"
echo "[device_check] extension + GPU pytest: $((SECONDS - t0)) s"

python3 - <<'EOF' 2>&1 | tee "$OUT/timing.log" || echo "[device_check] timing failed"
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
ms = tt.do_bench(lambda: cb.token_logprobs_with_sequence_sums(logits.detach(), targets, mask), warmup=25, rep=200,
                 return_mode="median")
print(f"log-probs fwd: {ms:.3f} ms = {logits.numel() * 2 / ms / 1e9:.2f} TB/s over 1 pass ({ms_copy / 2 / ms:.0%} of copy)")
EOF

if [[ "${LENS_SANITIZER:-1}" == 1 ]]; then
  CS=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  if [[ -x "$CS" ]]; then
    for tool in memcheck racecheck synccheck; do
      t0=$SECONDS
      rc=0
      timeout "${LENS_SANITIZER_TIMEOUT:-60}" "$CS" --tool "$tool" --error-exitcode 3 \
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
