"""pytest-benchmark wrappers of the loss-head cases: logits and hidden paths, forward + backward and
forward only, every provider that runs on the device (ours per backend, eager, compile, Liger, CCE)."""
import pytest
from bench_params import bench_params

from lens_kernels.bench import Case

ODD_V = 1001  # no multiple of any block size
CPU_CASES = [
    Case("logits", B=3, T=16, V=ODD_V, dtype="float32"),
    Case("logits", B=3, T=16, V=ODD_V, dtype="bfloat16"),
    Case("logits-fwd", B=3, T=16, V=ODD_V, dtype="float32"),
    Case("logits-fwd", B=3, T=16, V=ODD_V, dtype="bfloat16"),
    Case("hidden", B=3, T=8, V=ODD_V, H=32, dtype="float32"),
    Case("hidden-fwd", B=3, T=8, V=ODD_V, H=32, dtype="float32"),
]
# Every GPU provider on a real vocabulary size, small enough for the float64 reference (N * V <= 2^23);
# run by benchmarks/device_check.sh. lens-bench measures the large shapes.
GPU_CASES = [
    Case("logits", B=2, T=128, V=32003, dtype="bfloat16"),
    Case("logits-fwd", B=2, T=128, V=32003, dtype="bfloat16"),
    Case("hidden", B=2, T=128, V=32003, H=1024, dtype="bfloat16"),
    Case("hidden-fwd", B=2, T=128, V=32003, H=1024, dtype="bfloat16"),
]
# torch.compile pays its compile per case (C++ on CPU, tens of seconds each; Triton on a GPU): one
# case per device is enough here, and lens-bench measures it on the others.
COMPILE_CASES = {("cpu", CPU_CASES[0].name), ("cuda", GPU_CASES[0].name)}


def _cheap(device, case, provider):
    return provider.name != "compile" or (device, case.name) in COMPILE_CASES


@pytest.mark.parametrize("device,case,provider", bench_params([("cpu", CPU_CASES), ("cuda", GPU_CASES)], _cheap))
def test_loss_head(run_provider, device, case, provider):
    run_provider(case, provider, device)
