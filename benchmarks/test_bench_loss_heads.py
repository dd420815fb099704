"""pytest-benchmark wrappers of the loss-head cases: logits and hidden paths, forward + backward and
forward only, every provider that runs on the device (ours per backend, eager, compile, Liger, CCE)."""
import pytest
import torch

from lens_kernels.bench import Case, providers_for

ODD_V = 1001  # no multiple of any block size
CPU_CASES = [
    Case("logits", B=3, T=16, V=ODD_V, dtype="float32"),
    Case("logits", B=3, T=16, V=ODD_V, dtype="bfloat16"),
    Case("logits-fwd", B=3, T=16, V=ODD_V, dtype="float32"),
    Case("logits-fwd", B=3, T=16, V=ODD_V, dtype="bfloat16"),
    Case("hidden", B=3, T=8, V=ODD_V, H=32, dtype="float32"),
    Case("hidden-fwd", B=3, T=8, V=ODD_V, H=32, dtype="float32"),
]
# Big enough for the GPU kernels to be exercised past launch overhead, small enough for the
# float64 reference; run by benchmarks/device_check.sh.
GPU_CASES = [
    Case("logits", B=4, T=512, V=32003, dtype="bfloat16"),
    Case("logits-fwd", B=4, T=512, V=32003, dtype="bfloat16"),
    Case("hidden", B=4, T=512, V=32003, H=1024, dtype="bfloat16"),
    Case("hidden-fwd", B=4, T=512, V=32003, H=1024, dtype="bfloat16"),
]
# torch.compile builds C++ for every case on CPU (tens of seconds each): one case is enough there.
CPU_COMPILE_CASES = {CPU_CASES[0].name}


def _params():
    params = []
    for device, cases in (("cpu", CPU_CASES), ("cuda", GPU_CASES)):
        providers = providers_for(torch.device(device))
        for case in cases:
            for provider in providers:
                if case.path not in provider.paths:
                    continue
                if device == "cpu" and provider.name == "compile" and case.name not in CPU_COMPILE_CASES:
                    continue
                marks = [pytest.mark.gpu] if device == "cuda" else []
                params.append(pytest.param(device, case, provider, marks=marks,
                                           id=f"{device}-{case.name.replace(' ', '-')}-{provider.name}"))
    return params


@pytest.mark.parametrize("device,case,provider", _params())
def test_loss_head(run_provider, device, case, provider):
    run_provider(case, provider, device)
