"""pytest-benchmark wrapper of LENS ``group_advantages`` (4096 completions on CPU; 4096 and 65536 on
a GPU), checked against the float64 reference first."""
import pytest
import torch

from lens_kernels.bench import Case, providers_for

CASES = [("cpu", Case("advantages", B=4096, T=16, dtype="float32"))]
CASES += [("cuda", Case("advantages", B=n, T=64, dtype="float32")) for n in (4096, 65536)]


def _params():
    params = []
    for device, case in CASES:
        for provider in providers_for(torch.device(device)):
            if case.path in provider.paths:
                marks = [pytest.mark.gpu] if device == "cuda" else []
                params.append(pytest.param(device, case, provider, marks=marks,
                                           id=f"{device}-N={case.B}-{provider.name}"))
    return params


@pytest.mark.parametrize("device,case,provider", _params())
def test_lens_advantages(run_provider, device, case, provider):
    run_provider(case, provider, device)
