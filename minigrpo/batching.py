"""Which prompts a rank trains on at each step, and the prompts rendered once up front.

The order is a pure function of (seed, step): epoch e visits the dataset in the permutation
seeded by seed + e, and step k (1-based) takes global positions [(k-1)*P, k*P) of the
concatenated epochs, rank r the r-th contiguous slice of them. Nothing about the data position
needs saving beyond the step number, and a resumed run sees exactly the prompts it would have.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np


def step_prompt_indices(step: int, num_rows: int, prompts_per_step: int, seed: int, rank: int, world: int) -> list[int]:
    """Dataset row indices of this rank's prompts at `step` (1-based)."""
    if num_rows < 1:
        raise ValueError("the training dataset is empty")
    per_rank = prompts_per_step // world
    start = (step - 1) * prompts_per_step + rank * per_rank
    out = []
    for pos in range(start, start + per_rank):
        epoch, i = divmod(pos, num_rows)
        out.append(int(_permutation(num_rows, seed + epoch)[i]))
    return out


_PERM_CACHE: dict[tuple[int, int], np.ndarray] = {}


def _permutation(n: int, seed: int) -> np.ndarray:
    key = (n, seed)
    if key not in _PERM_CACHE:
        _PERM_CACHE.clear()  # one epoch's permutation at a time is enough
        _PERM_CACHE[key] = np.random.default_rng(seed).permutation(n)
    return _PERM_CACHE[key]


@dataclass
class PromptSet:
    """A dataset's prompts rendered and tokenized once, plus the columns rewards receive."""

    texts: list[str]  # [rows] rendered prompt strings
    ids: list[list[int]]  # [rows] prompt token ids
    columns: dict[str, list]  # dataset column -> [rows]

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, idx: list[int]) -> tuple[list[str], list[list[int]], dict[str, list]]:
        return [self.texts[i] for i in idx], [self.ids[i] for i in idx], {k: [v[i] for i in idx] for k, v in self.columns.items()}


def required_columns(fn) -> list[str]:
    """Keyword arguments a reward function needs (no default) besides completions and prompts."""
    params = list(inspect.signature(fn).parameters.values())[1:]  # the first is the completions
    return [
        p.name for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty and p.name != "prompts"
    ]


def prepare_prompts(dataset, tokenizer, template, max_prompt_length: int) -> PromptSet:
    """Render every row through the chat template and tokenize it, once, before training starts,
    so a prompt that is too long is an error now rather than at step 3,000."""
    from minigrpo.data import render_prompt, tokenize_prompts

    texts = [render_prompt(tokenizer, row, template) for row in dataset]
    ids = tokenize_prompts(tokenizer, texts, max_prompt_length)
    return PromptSet(texts, ids, {c: list(dataset[c]) for c in dataset.column_names})
