#!/usr/bin/env bash
# The CUDA kernels on a GPU machine, in one call (for benchmarks/device_check.sh or by hand):
#   1. CMake build + the standalone test binary (float64 CPU reference, every variant the device runs);
#   2. the extension built in place against the machine's torch, and the GPU pytest of the backend;
#   3. a timing of the fused loss variants at the headline shape (N=16384, V=151936, bf16) against a
#      device-to-device copy, as bandwidth over the 2-pass byte count.
# Writes logs under $OUT when set. Run from the repository root.
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
build/cmake/lens_kernels_test | tee "$OUT/lens_kernels_test.log" | tail -40
echo "[device_check] test binary: $((SECONDS - t0)) s"

t0=$SECONDS
LENS_KERNELS_BUILD_CUDA=1 python3 setup.py build_ext --inplace >"$OUT/build_ext.log" 2>&1 || {
  tail -40 "$OUT/build_ext.log"; exit 1; }
python3 -m pytest -q -m gpu tests/test_cuda_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
echo "[device_check] extension + GPU pytest: $((SECONDS - t0)) s"

python3 - <<'EOF' 2>&1 | tee "$OUT/timing.log"
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
for path in ("stream", "smem_row", "cluster"):
    if cb.fused_loss_path(V, torch.bfloat16, path) != path:
        print(f"fused loss {path}: not runnable at V={V}")
        continue
    def step():
        loss, _ = cb.policy_loss_from_logits(x, targets, mask, adv, path=path)
        loss.backward()
        x.grad = None
    ms = tt.do_bench(step, warmup=25, rep=200, return_mode="median")
    print(f"fused loss fwd+bwd {path}: {ms:.3f} ms = {2 * logits.numel() * 2 / ms / 1e9:.2f} TB/s over 2 passes "
          f"({ms_copy / ms:.0%} of copy)")
ms = tt.do_bench(lambda: cb.token_logprobs_with_sequence_sums(logits.detach(), targets, mask), warmup=25, rep=200,
                 return_mode="median")
print(f"log-probs fwd: {ms:.3f} ms = {logits.numel() * 2 / ms / 1e9:.2f} TB/s over 1 pass ({ms_copy / 2 / ms:.0%} of copy)")
EOF
