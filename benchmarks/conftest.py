"""Shared fixtures of the pytest-benchmark wrappers: the same cases and providers as ``lens-bench``.

``pytest benchmarks/ --benchmark-only`` times them; ``--benchmark-disable`` runs each once (the CI
smoke test). Every test first checks the provider against the float64 reference.
"""
import math
import os

import pytest
import torch

from lens_kernels.bench import Unavailable, compare, make_inputs, within_tolerance
from lens_kernels.bench.providers import grad_leaves
from lens_kernels.bench.runner import _reference_outputs, reference_fits

ROUNDS = int(os.environ.get("LENS_BENCH_ROUNDS", "10"))
# Formula-exact providers: ours, and the TRL-style torch code. Liger and CCE differ by design in
# places (CCE filters small gradients), so their rows record the difference and only need finite values.
STRICT = ("ours", "eager", "compile")


@pytest.fixture
def run_provider(benchmark):
    def run(case, provider, device):
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        inputs = make_inputs(case, device)
        for leaf in grad_leaves(case, inputs):
            leaf.requires_grad_(True)
        assert reference_fits(case), "keep benchmark-test shapes small enough for the float64 reference"
        expected = _reference_outputs(case, inputs)
        try:
            fn = provider.build(case, inputs)
        except Unavailable as exc:
            pytest.skip(f"{provider.name}: {exc}")
        diffs = compare(case, fn(), expected, inputs["mask"])
        benchmark.extra_info.update(diffs, case=case.name, provider=provider.name)
        if provider.kind == "ours" or provider.name in STRICT:
            assert within_tolerance(case, diffs), f"{provider.name} on {case.name}: {diffs}"
        else:
            assert all(math.isfinite(v) for v in diffs.values()), f"{provider.name} on {case.name}: {diffs}"
        benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)

    return run
