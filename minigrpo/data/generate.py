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

With `solutions=True` each task also records the expression it was built from, as the steps
("7 + 10 = 17", "17 + 4 = 21") and the equation ("(7 + 10) + 4"): a known answer for a supervised
warm-up (`minigrpo.warmup`). The random draws are the same either way, so are the tasks.
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
    solutions: bool = False,
) -> dict[str, list]:
    """Make `num_samples` solvable Countdown tasks.

    Args:
        num_samples: how many tasks.
        seed: the tasks are a deterministic function of the seed (and the other arguments).
        min_numbers, max_numbers: each task has a uniformly drawn count of numbers in this range (2..6).
        max_number: numbers are drawn uniformly from 1..max_number, repeats allowed.
        max_target: targets lie in 1..max_target.
        solutions: also return each task's construction: `steps` (one "a op b = c" per operator,
            in order) and `equation` (the expression, fully parenthesized, without "= target").

    Returns:
        `{"nums": [[int, ...], ...], "target": [int, ...]}` (plus `steps` and `equation` with
        `solutions`), columns of length `num_samples`.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if not 2 <= min_numbers <= max_numbers <= 6:  # 6 keeps every product of numbers <= 99**6 inside int64
        raise ValueError(f"need 2 <= min_numbers <= max_numbers <= 6, got {min_numbers}, {max_numbers}")
    if max_number < 1 or max_number > 999 or max_target < 1:
        raise ValueError(f"need 1 <= max_number <= 999 and max_target >= 1, got {max_number}, {max_target}")
    rng = np.random.default_rng(seed)
    counts = rng.integers(min_numbers, max_numbers + 1, size=num_samples)  # [S] numbers per task
    columns: dict[str, list] = {name: [None] * num_samples for name in
                                ("nums", "target", *(("steps", "equation") if solutions else ()))}
    for k in range(min_numbers, max_numbers + 1):
        slots = np.flatnonzero(counts == k)
        k_rng = np.random.default_rng([seed, k])  # one stream per count: adding a count changes no other
        task_nums, task_targets, choices = _solvable_tasks(k_rng, k, len(slots), max_number, max_target)
        for n, (slot, ns, t) in enumerate(zip(slots.tolist(), task_nums.tolist(), task_targets.tolist())):
            columns["nums"][slot], columns["target"][slot] = ns, t
            if solutions:
                columns["steps"][slot], columns["equation"][slot] = _replay(ns, choices[n].tolist())
    return columns


def _solvable_tasks(
    rng: np.random.Generator, k: int, n: int, max_number: int, max_target: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n` tasks of `k` numbers, in round order: nums [n, k] int64, targets [n] int64, and the
    choices that built each target [n, k-1, 3] (left slot, right slot, operator per step)."""
    kept_nums, kept_targets = [np.empty((0, k), np.int64)], [np.empty(0, np.int64)]
    kept_choices, have = [np.empty((0, k - 1, 3), np.int64)], 0
    while have < n:
        drawn = rng.integers(1, max_number + 1, size=(_ROUND, k))  # [R, k]
        target, ok, choices = _random_expression_values(rng, drawn)  # [R], [R], [R, k-1, 3]
        ok &= (target >= 1) & (target <= max_target)
        kept_nums.append(drawn[ok])
        kept_targets.append(target[ok])
        kept_choices.append(choices[ok])
        have += int(ok.sum())
    return np.concatenate(kept_nums)[:n], np.concatenate(kept_targets)[:n], np.concatenate(kept_choices)[:n]


def _random_expression_values(
    rng: np.random.Generator, drawn: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Value of one random expression tree over each row of `drawn` [R, k], and whether it is valid.

    Returns value [R] int64, ok [R] bool (False where a division was inexact or by zero), and the
    choices [R, k-1, 3] int64: per step, the left and right operand slots and the operator.
    """
    r, k = drawn.shape
    rows = np.arange(r)
    values = drawn.astype(np.int64)  # [R, k]: column j < live holds a live value
    ok = np.ones(r, dtype=bool)  # [R]
    choices = np.empty((r, k - 1, 3), np.int64)  # [R, k-1, 3]
    for live in range(k, 1, -1):
        i = rng.integers(0, live, size=r)  # [R] left operand position
        j = rng.integers(0, live - 1, size=r)  # [R] right operand position, != i
        j += j >= i
        op = rng.integers(0, 4, size=r)  # [R]
        choices[:, k - live] = np.stack([i, j, op], axis=1)
        a, b = values[rows, i], values[rows, j]
        safe_b = np.where(b == 0, 1, b)
        ok &= (op != _DIV) | ((b != 0) & (a % safe_b == 0))
        result = np.select([op == _ADD, op == _SUB, op == _MUL], [a + b, a - b, a * b], default=a // safe_b)
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        values[rows, lo] = result  # the result takes the lower slot, the last live value fills the other
        values[rows, hi] = values[rows, live - 1]
    return values[:, 0], ok, choices


_SYMBOLS = "+-*/"


def _replay(nums: list[int], choices: list[list[int]]) -> tuple[list[str], str]:
    """One task's construction, replayed exactly as `_random_expression_values` combined the slots:
    the steps ("a op b = c") and the fully parenthesized equation, outer parentheses dropped."""
    values, texts, steps = list(nums), [str(n) for n in nums], []
    for live, (i, j, op) in zip(range(len(nums), 1, -1), choices):
        a, b = values[i], values[j]
        result = (a + b, a - b, a * b, a // b if b else 0)[op]
        steps.append(f"{a} {_SYMBOLS[op]} {b} = {result}")
        lo, hi = min(i, j), max(i, j)
        values[lo], texts[lo] = result, f"({texts[i]} {_SYMBOLS[op]} {texts[j]})"
        values[hi], texts[hi] = values[live - 1], texts[live - 1]
    return steps, texts[0][1:-1]
