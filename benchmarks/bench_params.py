"""Parametrization shared by the benchmark test files (a module of its own, not conftest, so that
importing it never picks up another folder's conftest)."""
import pytest
import torch

from lens_kernels.bench.providers import case_provider_pairs


def bench_params(cases_by_device, keep=lambda device, case, provider: True):
    """pytest params (device, case, provider) for the providers that apply; CUDA ones marked gpu."""
    params = []
    for device, cases in cases_by_device:
        marks = [pytest.mark.gpu] if device == "cuda" else []
        for case, provider in case_provider_pairs(torch.device(device), cases):
            if keep(device, case, provider):
                name = f"{device}-{case.name.replace(' ', '-')}-{provider.name}"
                params.append(pytest.param(device, case, provider, marks=marks, id=name))
    return params
