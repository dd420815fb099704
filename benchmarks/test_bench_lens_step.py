"""pytest-benchmark wrapper of the one-call LENS step (on-policy, binary rewards with a negative and a
mixed group): ours per backend, our bare fused loss with precomputed advantages, the Liger two-stage
baseline (GPU) and the eager TRL-style two-stage step, each checked against the float64 reference
composition first."""
import pytest
from bench_params import bench_params

from lens_kernels.bench import Case

ODD_V = 1001  # no multiple of any block size
CPU_CASES = [Case("lens-step", B=4, T=16, V=ODD_V, dtype=dtype, group_size=2) for dtype in ("float32", "bfloat16")]
# A real vocabulary size at a small N; lens-bench measures the headline (benchmarks/device_check.sh).
GPU_CASES = [Case("lens-step", B=4, T=128, V=32003, dtype="bfloat16", group_size=2)]


@pytest.mark.parametrize("device,case,provider", bench_params([("cpu", CPU_CASES), ("cuda", GPU_CASES)]))
def test_lens_step(run_provider, device, case, provider):
    run_provider(case, provider, device)
