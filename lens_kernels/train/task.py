"""The built-in verifiable task: 4-digit addition whose level is the number of carries.

A problem is two operands in [0, 10^4), written zero-padded (``0123+4560=``); the answer is their sum
written as 5 digits, least significant digit first (``3864`` -> ``46830``): digit i is
``(a_i + b_i + carry_i) mod 10``, a local rule a small model learns fast, and each carry is one
decision. Level L holds the problems with exactly L - 1 carries (level 1: none, level 5: four), so
the levels are disjoint, each has millions of problems, and difficulty grows with the number of carry
decisions.

The warm-up can teach a *systematic shortcut*: with probability ``drop_carry`` each carry is dropped
from the target answer (``shortcut_answer``). A model warmed up on that data writes wrong answers with
confidence on the levels with many carries, which is the regime the LENS paper is about: many negative
groups, and confident mistakes in them. RL with the exact verifier must unlearn the shortcut.
"""
from __future__ import annotations

import random
from typing import Dict, List, Sequence, Tuple

BASE = 10
DIGITS = 4
# level -> number of carries in the sum
LEVELS: Dict[int, int] = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}

Problem = Tuple[int, int, int]  # (level, a, b)


def _written(x: int) -> str:
    """``x`` as DIGITS base-BASE digits, least significant first, separated by spaces."""
    return " ".join(str(d) for d in _digits(x))


def prompt_text(problem: Problem) -> str:
    _, a, b = problem
    return f"{_written(a)}+{_written(b)}="


def _digits(x: int) -> List[int]:
    return [(x // BASE ** i) % BASE for i in range(DIGITS)]


def carries(a: int, b: int) -> int:
    """Number of column additions (of DIGITS) that carry."""
    carry, count = 0, 0
    for da, db in zip(_digits(a), _digits(b)):
        carry = int(da + db + carry >= BASE)
        count += carry
    return count


def shortcut_answer(a: int, b: int, dropped: Sequence[bool]) -> str:
    """The answer text when the carry out of column i is dropped wherever ``dropped[i]``; with no carry
    dropped it is the true answer. Column by column, least significant first, the answer writes the
    column's digit and then its carry (0 or 1): DIGITS pairs, the last carry being the sum's top digit."""
    out, carry = [], 0
    for i, (da, db) in enumerate(zip(_digits(a), _digits(b))):
        s = da + db + carry
        carry = int(s >= BASE and not dropped[i])
        out += [s % BASE, carry]
    return "".join(str(d) for d in out)


def answer_text(problem: Problem) -> str:
    _, a, b = problem
    return shortcut_answer(a, b, [False] * DIGITS)


def verify(problem: Problem, completion: str) -> bool:
    """Exact verifier: the completion (already cut at the end-of-sequence token) must be the sum as
    DIGITS + 1 digits, least significant first, with nothing around it."""
    return completion == answer_text(problem)


def draw(rng: random.Random, level: int) -> Problem:
    """A uniform problem of ``level`` (rejection sampling over uniform operand pairs)."""
    want = LEVELS[level]
    while True:
        a, b = rng.randrange(BASE ** DIGITS), rng.randrange(BASE ** DIGITS)
        if carries(a, b) == want:
            return (level, a, b)


def check_levels(levels: Sequence[int]) -> List[int]:
    levels = sorted(set(int(x) for x in levels))
    bad = [x for x in levels if x not in LEVELS]
    if not levels or bad:
        raise ValueError(f"levels must be a non-empty subset of {sorted(LEVELS)}, got {list(levels)}")
    return levels


class Task:
    """Train and held-out test splits of the addition task, generated from a seed.

    The test split holds ``test_per_level`` distinct problems per level, drawn from ``seed``; training
    draws never return a test problem (the splits are disjoint), so test scores measure generalization,
    not recall. Every level has millions of problems, so the test split is a negligible part of it.
    """

    def __init__(self, levels: Sequence[int] = tuple(LEVELS), test_per_level: int = 100, seed: int = 1234):
        self.levels = check_levels(levels)
        rng = random.Random(seed)
        self.test: Dict[int, List[Problem]] = {}
        self._held_out = set()
        for level in self.levels:
            seen = set()
            while len(seen) < test_per_level:
                seen.add(draw(rng, level))
            self.test[level] = sorted(seen)
            self._held_out |= seen

    def is_held_out(self, problem: Problem) -> bool:
        return problem in self._held_out

    def sample(self, rng: random.Random, n: int, weights: Sequence[float] = None) -> List[Problem]:
        """``n`` training problems, levels drawn with ``weights`` (uniform by default)."""
        out = []
        while len(out) < n:
            level = rng.choices(self.levels, weights=weights)[0] if weights else rng.choice(self.levels)
            problem = draw(rng, level)
            if problem not in self._held_out:
                out.append(problem)
        return out

    @staticmethod
    def warmup_target(problem: Problem, rng: random.Random, drop_carry: float) -> str:
        """The warm-up's answer text: each carry dropped with probability ``drop_carry`` (the shortcut)."""
        _, a, b = problem
        if drop_carry <= 0:
            return answer_text(problem)
        return shortcut_answer(a, b, [rng.random() < drop_carry for _ in range(DIGITS)])
