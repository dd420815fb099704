"""Evaluation statistics of ``lens-train``: the unbiased Pass@k estimator and the paired bootstrap."""
from __future__ import annotations

import random
from typing import Dict, List, Sequence, Tuple


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021, the LENS paper's
    Table 1): 1 - C(n - c, k) / C(n, k), the probability that k samples drawn without replacement from
    the n hold at least one correct one. Computed as a product, exact for any n."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(counts: Sequence[int], n: int, k: int) -> float:
    """Mean Pass@k over problems, from each problem's count of correct samples out of ``n``."""
    return sum(pass_at_k(n, c, k) for c in counts) / max(1, len(counts))


def paired_bootstrap(diffs: Sequence[float], *, resamples: int = 10000, seed: int = 0,
                     level: float = 0.95) -> Tuple[float, float, float]:
    """Mean of paired differences (one per seed) and its percentile bootstrap interval: the seeds are
    resampled with replacement ``resamples`` times. Returns (mean, low, high). With one seed, or all
    differences equal, the interval is that single value."""
    diffs = [float(d) for d in diffs]
    if not diffs:
        raise ValueError("paired_bootstrap needs at least one difference")
    mean = sum(diffs) / len(diffs)
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return mean, lo, hi


def pass_table(counts: Dict[int, List[int]], n: int, ks: Sequence[int]) -> Dict[str, Dict[str, float]]:
    """{level or "all": {"pass@k": value}} from per-problem correct counts per level; "all" is the mean
    over all problems of all levels."""
    out = {str(level): {f"pass@{k}": mean_pass_at_k(c, n, k) for k in ks} for level, c in counts.items()}
    every = [c for level_counts in counts.values() for c in level_counts]
    out["all"] = {f"pass@{k}": mean_pass_at_k(every, n, k) for k in ks}
    return out
