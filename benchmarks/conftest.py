"""Shared fixtures of the pytest-benchmark wrappers: the same cases and providers as ``lens-bench``.

``pytest benchmarks/ --benchmark-only`` times them; ``--benchmark-disable`` runs each once (the CI
smoke test). Every test first checks the provider against the float64 reference. On a GPU each timed
call ends with ``torch.cuda.synchronize()``, so pytest-benchmark's host clock times the kernels, not
their launches.
"""
import math
import os

import pytest
import torch

from lens_kernels.bench import Unavailable, compare, make_inputs, within_tolerance
from lens_kernels.bench.providers import grad_leaves
from lens_kernels.bench.runner import reference_outputs, reference_fits

ROUNDS = int(os.environ.get("LENS_BENCH_ROUNDS", "10"))
# Every provider must be within the tolerance of its family (lens_kernels/bench/runner.py); until a GPU
# run has measured Liger's and CCE's error, their rows record the difference and need only finite values.
PROVISIONAL = ("liger", "cce", "cce-exact")


def synchronized(fn, device):
    """``fn`` followed by a device synchronize on CUDA (pytest-benchmark reads a host clock)."""
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@pytest.fixture
def run_provider(benchmark):
    def run(case, provider, device):
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        inputs = make_inputs(case, device)
        inputs.pop("stats")
        for leaf in grad_leaves(case, inputs):
            leaf.requires_grad_(True)
        assert reference_fits(case), "keep benchmark-test shapes small enough for the float64 reference"
        expected = reference_outputs(case, inputs)
        try:
            fn = provider.build(case, inputs)
        except Unavailable as exc:
            pytest.skip(f"{provider.name}: {exc}")
        diffs = compare(case, fn(), expected, inputs["mask"], upstream=getattr(fn, "upstream", 1.0))
        benchmark.extra_info.update(diffs, case=case.name, provider=provider.name)
        if provider.tolerance in PROVISIONAL:
            assert all(math.isfinite(v) for v in diffs.values()), f"{provider.name} on {case.name}: {diffs}"
        else:
            assert within_tolerance(case, diffs, provider.tolerance), f"{provider.name} on {case.name}: {diffs}"
        benchmark.pedantic(synchronized(fn, device), rounds=ROUNDS, iterations=1, warmup_rounds=1)

    return run
