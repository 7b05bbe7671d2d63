"""Intervals for held-out results, so a gain can be told from noise. Pure functions over counts and
per-task outcomes (no torch, no I/O).

- `wilson_interval`: a 95% interval for a rate (success, format, pass@k) of n tasks. Wilson's score
  interval, not the normal approximation p +- 1.96 sqrt(p(1-p)/n), which collapses to [0, 0] at 0/n and
  overshoots [0, 1] near its ends at small n.
- `paired_difference`: two models on the same tasks. The difference of their rates, a 95% interval from
  a paired bootstrap (tasks resampled with replacement, both models' outcomes kept together, so the
  tasks both solve or both fail add no noise), and McNemar's exact two-sided p-value from the tasks
  where they disagree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for `successes` of `n` (95% with the default z)."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes} of {n}")
    p, z2 = successes / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # at 0 (or n) successes the bound is 0 (or 1) exactly; the formula leaves a rounding error there
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def mcnemar_p(only_a: int, only_b: int) -> float:
    """McNemar's exact two-sided p-value: under "no difference" each of the only_a + only_b tasks that
    exactly one model solves is equally likely to be either's: only_a ~ Binomial(d, 1/2), and the
    two-sided p is twice P(X <= min(only_a, only_b)), at most 1."""
    d = only_a + only_b
    if d == 0:
        return 1.0
    tail = sum(math.comb(d, i) for i in range(min(only_a, only_b) + 1)) / 2**d
    return min(1.0, 2 * tail)


def paired_difference(a: Sequence[bool], b: Sequence[bool], resamples: int = 10_000, seed: int = 0,
                      level: float = 0.95) -> dict[str, float]:
    """B's rate minus A's on the same tasks (`a[i]`, `b[i]`: task i solved by A, by B), with a paired
    bootstrap percentile interval (`resamples` resamplings of the tasks, seeded: the same outcomes give
    the same interval) and McNemar's exact p-value.

    Returns `difference`, `low`, `high`, `only_a` (tasks only A solves), `only_b`, `tasks`, `mcnemar_p`."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"need outcomes of the same non-empty task list, got {len(a)} and {len(b)}")
    x = np.asarray(b, dtype=np.int64) - np.asarray(a, dtype=np.int64)  # [n] per task: -1, 0 or +1
    n = len(x)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)  # [resamples] the mean difference of each resampling
    for start in range(0, resamples, 1000):  # [1000, n] index draws at a time: bounded memory
        rows = min(1000, resamples - start)
        means[start:start + rows] = x[rng.integers(0, n, size=(rows, n))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    only_a, only_b = int((x < 0).sum()), int((x > 0).sum())
    return {"difference": float(x.mean()), "low": float(low), "high": float(high), "only_a": only_a,
            "only_b": only_b, "tasks": n, "mcnemar_p": mcnemar_p(only_a, only_b)}
