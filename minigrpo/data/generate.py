"""An offline generator of Countdown tasks like `Jiayi-Pan/Countdown-Tasks-3to4`, solvable by construction.

Each task is made by drawing its numbers, then combining them into one value by a random expression
tree: repeatedly pick two of the remaining values (in random order) and an operator from + - * /,
and replace them by the result. Any binary tree over the numbers can come out. A candidate is kept
only when every division is exact and non-zero (so all intermediate results are integers) and the
final value is a target in 1..max_target. The numbers are shown in the order they were drawn,
which says nothing about the order of the solution.

Vectorized with numpy over fixed-size rounds of candidates, so 100k tasks take well under a second,
and the tasks for a seed do not depend on how many are asked for: `generate_countdown(n, seed=s)`
is a prefix of `generate_countdown(m, seed=s)` for n < m.
"""

from __future__ import annotations

import numpy as np

_ROUND = 1 << 15  # candidates per numbers-count per round; fixed so a seed's tasks do not depend on n
_ADD, _SUB, _MUL, _DIV = range(4)


def generate_countdown(
    num_samples: int,
    *,
    seed: int = 0,
    min_numbers: int = 3,
    max_numbers: int = 4,
    max_number: int = 99,
    max_target: int = 999,
) -> dict[str, list]:
    """Make `num_samples` solvable Countdown tasks.

    Args:
        num_samples: how many tasks.
        seed: the tasks are a deterministic function of the seed (and the other arguments).
        min_numbers, max_numbers: each task has a uniformly drawn count of numbers in this range (2..6).
        max_number: numbers are drawn uniformly from 1..max_number, repeats allowed.
        max_target: targets lie in 1..max_target.

    Returns:
        `{"nums": [[int, ...], ...], "target": [int, ...]}`, columns of length `num_samples`.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if not 2 <= min_numbers <= max_numbers <= 6:  # 6 keeps every product of numbers <= 99**6 inside int64
        raise ValueError(f"need 2 <= min_numbers <= max_numbers <= 6, got {min_numbers}, {max_numbers}")
    if max_number < 1 or max_number > 999 or max_target < 1:
        raise ValueError(f"need 1 <= max_number <= 999 and max_target >= 1, got {max_number}, {max_target}")
    rng = np.random.default_rng(seed)
    counts = rng.integers(min_numbers, max_numbers + 1, size=num_samples)  # [S] numbers per task
    nums: list[list[int] | None] = [None] * num_samples
    targets: list[int | None] = [None] * num_samples
    for k in range(min_numbers, max_numbers + 1):
        slots = np.flatnonzero(counts == k)
        k_rng = np.random.default_rng([seed, k])  # one stream per count: adding a count changes no other
        task_nums, task_targets = _solvable_tasks(k_rng, k, len(slots), max_number, max_target)
        for slot, ns, t in zip(slots.tolist(), task_nums.tolist(), task_targets.tolist()):
            nums[slot], targets[slot] = ns, t
    return {"nums": nums, "target": targets}


def _solvable_tasks(
    rng: np.random.Generator, k: int, n: int, max_number: int, max_target: int
) -> tuple[np.ndarray, np.ndarray]:
    """`n` tasks of `k` numbers: nums [n, k] int64 and targets [n] int64, in round order."""
    kept_nums, kept_targets, have = [np.empty((0, k), np.int64)], [np.empty(0, np.int64)], 0
    while have < n:
        drawn = rng.integers(1, max_number + 1, size=(_ROUND, k))  # [R, k]
        target, ok = _random_expression_values(rng, drawn)  # [R], [R]
        ok &= (target >= 1) & (target <= max_target)
        kept_nums.append(drawn[ok])
        kept_targets.append(target[ok])
        have += int(ok.sum())
    return np.concatenate(kept_nums)[:n], np.concatenate(kept_targets)[:n]


def _random_expression_values(rng: np.random.Generator, drawn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Value of one random expression tree over each row of `drawn` [R, k], and whether it is valid.

    Returns value [R] int64 and ok [R] bool (False where a division was inexact or by zero).
    """
    r, k = drawn.shape
    rows = np.arange(r)
    values = drawn.astype(np.int64)  # [R, k]: column j < live holds a live value
    ok = np.ones(r, dtype=bool)  # [R]
    for live in range(k, 1, -1):
        i = rng.integers(0, live, size=r)  # [R] left operand position
        j = rng.integers(0, live - 1, size=r)  # [R] right operand position, != i
        j += j >= i
        op = rng.integers(0, 4, size=r)  # [R]
        a, b = values[rows, i], values[rows, j]
        safe_b = np.where(b == 0, 1, b)
        ok &= (op != _DIV) | ((b != 0) & (a % safe_b == 0))
        result = np.select([op == _ADD, op == _SUB, op == _MUL], [a + b, a - b, a * b], default=a // safe_b)
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        values[rows, lo] = result  # the result takes the lower slot, the last live value fills the other
        values[rows, hi] = values[rows, live - 1]
    return values[:, 0], ok
