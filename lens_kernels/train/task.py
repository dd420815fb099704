"""The built-in verifiable task: integer addition whose level sets the operand sizes.

Level L adds an ``a``-digit and a ``b``-digit number (operands drawn uniformly from [0, 10^digits)).
Carries make the higher levels hard for a small model, so after a short warm-up the easy levels are
mostly solved and the hard ones mostly not: negative groups are common, which is what LENS is for.
"""
from __future__ import annotations

import random
from typing import Dict, List, Sequence, Tuple

# level -> (digits of the first operand, digits of the second)
LEVELS: Dict[int, Tuple[int, int]] = {1: (1, 1), 2: (2, 1), 3: (2, 2), 4: (3, 2), 5: (3, 3)}

Problem = Tuple[int, int, int]  # (level, a, b)


def prompt_text(problem: Problem) -> str:
    _, a, b = problem
    return f"{a}+{b}="


def answer_text(problem: Problem) -> str:
    _, a, b = problem
    return str(a + b)


def verify(problem: Problem, completion: str) -> bool:
    """Exact verifier: the completion (already cut at the end-of-sequence token) must be the sum,
    written in plain decimal with nothing around it."""
    return completion == answer_text(problem)


def _draw(rng: random.Random, level: int) -> Problem:
    da, db = LEVELS[level]
    return (level, rng.randrange(10 ** da), rng.randrange(10 ** db))


def check_levels(levels: Sequence[int]) -> List[int]:
    levels = sorted(set(int(x) for x in levels))
    bad = [x for x in levels if x not in LEVELS]
    if not levels or bad:
        raise ValueError(f"levels must be a non-empty subset of {sorted(LEVELS)}, got {list(levels)}")
    return levels


class Task:
    """Train and held-out test splits of the addition task, generated from a seed.

    The test split holds ``test_per_level`` distinct problems per level, at most a fifth of the level's
    problems (level 1 has only 100); training draws never return a test problem, so test accuracy
    measures generalization, not recall.
    """

    def __init__(self, levels: Sequence[int] = tuple(LEVELS), test_per_level: int = 100, seed: int = 1234):
        self.levels = check_levels(levels)
        rng = random.Random(seed)
        self.test: Dict[int, List[Problem]] = {}
        self._held_out = set()
        for level in self.levels:
            da, db = LEVELS[level]
            seen = set()
            while len(seen) < min(test_per_level, 10 ** (da + db) // 5):
                seen.add(_draw(rng, level))
            self.test[level] = sorted(seen)
            self._held_out |= seen

    def sample(self, rng: random.Random, n: int, weights: Sequence[float] = None) -> List[Problem]:
        """``n`` training problems, levels drawn with ``weights`` (uniform by default)."""
        out = []
        while len(out) < n:
            level = rng.choices(self.levels, weights=weights)[0] if weights else rng.choice(self.levels)
            problem = _draw(rng, level)
            if problem not in self._held_out:
                out.append(problem)
        return out
