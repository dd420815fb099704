"""lens-train statistics: the unbiased Pass@k estimator against exact enumeration, and the paired bootstrap."""
import itertools
import math
import random

import pytest

from lens_kernels.train.stats import mean_pass_at_k, paired_bootstrap, pass_at_k, pass_table


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_equals_enumeration_of_k_subsets(n):
    # Pass@k is the chance that k of the n samples, drawn without replacement, hold a correct one: count
    # the k-subsets of n samples (c of them correct) that contain a correct sample
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            exact = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
            assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_large_n_and_edges():
    assert pass_at_k(16, 0, 16) == 0.0 and pass_at_k(16, 1, 16) == 1.0 and pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)
    assert pass_at_k(200, 3, 10) == pytest.approx(1 - math.comb(197, 10) / math.comb(200, 10), rel=1e-12)
    for bad in ((4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)):
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(*bad)


def test_mean_pass_and_table():
    counts = {1: [16, 0, 8], 2: [4]}
    assert mean_pass_at_k(counts[1], 16, 1) == pytest.approx((1 + 0 + 0.5) / 3)
    table = pass_table(counts, 16, [1, 16])
    assert table["1"]["pass@16"] == pytest.approx(2 / 3) and table["2"]["pass@1"] == pytest.approx(0.25)
    assert table["all"]["pass@1"] == pytest.approx((1 + 0 + 0.5 + 0.25) / 4)  # over problems, not levels


def test_paired_bootstrap_known_cases():
    # constant differences: the interval is the point
    assert paired_bootstrap([0.1] * 5) == pytest.approx((0.1, 0.1, 0.1))
    assert paired_bootstrap([-0.2]) == pytest.approx((-0.2, -0.2, -0.2))
    # two values: resampled means are 0, 0.5 or 1 with weights 1/4, 1/2, 1/4, so the 95% interval is [0, 1]
    mean, lo, hi = paired_bootstrap([0.0, 1.0])
    assert (mean, lo, hi) == (0.5, 0.0, 1.0)
    # many seeds drawn around +0.05 with sd 0.02: the interval holds the mean, is about 2 x 1.96 sd / sqrt(n)
    # wide, and excludes 0; deterministic for a given seed
    rng = random.Random(3)
    diffs = [0.05 + rng.gauss(0, 0.02) for _ in range(40)]
    mean, lo, hi = paired_bootstrap(diffs, seed=1)
    sd = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5
    assert lo < mean < hi and lo > 0
    assert (hi - lo) == pytest.approx(2 * 1.96 * sd / len(diffs) ** 0.5, rel=0.2)
    assert paired_bootstrap(diffs, seed=1) == (mean, lo, hi)
    with pytest.raises(ValueError):
        paired_bootstrap([])
