"""pytest-benchmark wrapper of LENS ``group_advantages`` (4096 completions on CPU; 4096 and 65536 on
a GPU), checked against the float64 reference first."""
import pytest
from bench_params import bench_params

from lens_kernels.bench import Case

CASES = [("cpu", [Case("advantages", B=4096, T=16, dtype="float32")]),
         ("cuda", [Case("advantages", B=n, T=64, dtype="float32") for n in (4096, 65536)])]


@pytest.mark.parametrize("device,case,provider", bench_params(CASES))
def test_lens_advantages(run_provider, device, case, provider):
    run_provider(case, provider, device)
