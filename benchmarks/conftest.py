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
from lens_kernels.bench.runner import reference_outputs, reference_fits

ROUNDS = int(os.environ.get("LENS_BENCH_ROUNDS", "10"))
# Ours (and our bare loss on the LENS step) must match the reference in every dtype. The TRL-style
# torch code must in fp32; in bf16 it takes log_softmax in bf16, whose rounding can move a token across
# the clip boundary and flip its gradient, and Liger and CCE differ by design in places (CCE filters
# small gradients): those rows record their difference and need only finite values.
STRICT_IN_FP32 = ("eager", "compile")


@pytest.fixture
def run_provider(benchmark):
    def run(case, provider, device):
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        inputs = make_inputs(case, device)
        for leaf in grad_leaves(case, inputs):
            leaf.requires_grad_(True)
        assert reference_fits(case), "keep benchmark-test shapes small enough for the float64 reference"
        expected = reference_outputs(case, inputs)
        try:
            fn = provider.build(case, inputs)
        except Unavailable as exc:
            pytest.skip(f"{provider.name}: {exc}")
        diffs = compare(case, fn(), expected, inputs["mask"])
        benchmark.extra_info.update(diffs, case=case.name, provider=provider.name)
        if provider.kind in ("ours", "bare") or (provider.name in STRICT_IN_FP32 and case.dtype == "float32"):
            assert within_tolerance(case, diffs), f"{provider.name} on {case.name}: {diffs}"
        else:
            assert all(math.isfinite(v) for v in diffs.values()), f"{provider.name} on {case.name}: {diffs}"
        benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)

    return run
