"""Which prompts a rank trains on at each step, and the prompts rendered once up front.

The order is a pure function of (seed, data position): epoch e visits the dataset in the
permutation seeded by seed + e, and a generation round that starts at global position `pos`
takes positions [pos, pos + P) of the concatenated epochs (P = prompts_per_step), rank r the
r-th contiguous slice of them. Without dynamic sampling step k's round starts at (k-1)*P; with
it a step may draw several rounds, so the position is saved in every checkpoint and a resumed
run continues from it, seeing exactly the prompts it would have.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np


def prompt_indices(position: int, num_rows: int, prompts_per_step: int, seed: int, rank: int, world: int) -> list[int]:
    """Dataset row indices of this rank's prompts in the round starting at global `position`."""
    if num_rows < 1:
        raise ValueError("the training dataset is empty")
    per_rank = prompts_per_step // world
    start = position + rank * per_rank
    out = []
    for pos in range(start, start + per_rank):
        epoch, i = divmod(pos, num_rows)
        out.append(int(_permutation(num_rows, seed + epoch)[i]))
    return out


def rollout_seed(seed: int, step: int, rank: int, world: int, completions: int, round_: int = 0) -> int:
    """The sampling seed of a rank's generation call at `step` (1-based) and generation round.

    vLLM gives completion i of a call the seed `seed + i` (request j, child c -> seed + j * G + c)
    and the torch engine seeds one generator per call with `seed`; either way each call owns the
    block [seed, seed + completions), and blocks of different (step, round, rank) never overlap (the old `step * 1009 + rank` gave ranks r and r + 1 all but
    one seed in common). The run's seed picks a disjoint region of 2**62 / 2**20 seeds.
    """
    slot = ((step * _MAX_ROUNDS + round_) * world + rank) * completions  # start of this call's block
    if round_ >= _MAX_ROUNDS or slot >= 2**42:
        raise ValueError(f"rollout seeds: step {step} x round {round_} x {world} ranks x {completions} completions "
                         "exceeds the seed space")
    return (seed % 2**20) * 2**42 + slot


_MAX_ROUNDS = 64  # generation rounds per step a seed block is reserved for
_PERM_CACHE: dict[tuple[int, int], np.ndarray] = {}


def _permutation(n: int, seed: int) -> np.ndarray:
    key = (n, seed)
    if key not in _PERM_CACHE:
        _PERM_CACHE.clear()  # one epoch's permutation at a time is enough
        _PERM_CACHE[key] = np.random.default_rng(seed).permutation(n)
    return _PERM_CACHE[key]


@dataclass
class PromptSet:
    """A dataset's prompts rendered and tokenized once, plus what rewards receive (TRL's way)."""

    texts: list[str]  # [rows] rendered prompt strings
    ids: list[list[int]]  # [rows] prompt token ids
    prompts: list  # [rows] a reward's `prompts`: the `prompt` column (str or messages) when the prompt
    #                was rendered from it, else `texts`
    columns: dict[str, list]  # dataset column -> [rows], as `reward_columns` chooses

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, idx: list[int]) -> tuple[list, list[list[int]], dict[str, list]]:
        """Rows `idx`: (reward prompts [P], prompt token ids [P], columns {name: [P]})."""
        return [self.prompts[i] for i in idx], [self.ids[i] for i in idx], {k: [v[i] for i in idx] for k, v in self.columns.items()}


def required_columns(fn) -> list[str]:
    """Dataset columns a reward function needs: its parameters without a default other than the
    arguments every reward is offered (`prompts`, `completions`, `completion_ids`, `trainer_state`)."""
    from minigrpo.rewards import REWARD_ARGUMENTS

    return [
        p.name for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
        and p.name not in REWARD_ARGUMENTS
    ]


def prepare_prompts(dataset, tokenizer, template, max_prompt_length: int) -> PromptSet:
    """Render every row through the chat template and tokenize it, once, before training starts,
    so a prompt that is too long is an error now rather than at step 3,000."""
    from minigrpo.data import render_prompt, tokenize_prompts

    texts = [render_prompt(tokenizer, row, template) for row in dataset]
    ids = tokenize_prompts(tokenizer, texts, max_prompt_length)
    columns = {c: list(dataset[c]) for c in reward_columns(dataset.column_names, template)}
    from_column = "prompt" not in columns and "prompt" in dataset.column_names
    return PromptSet(texts, ids, list(dataset["prompt"]) if from_column else texts, columns)


def reward_columns(column_names: list[str], template) -> list[str]:
    """The dataset columns rewards receive as keyword arguments: all of them, except `prompt` when
    the prompt was rendered from it (no template, no `messages` column: `render_prompt`'s third
    case), which rewards receive as `prompts` instead, as in TRL."""
    from_prompt = template is None and "messages" not in column_names and "prompt" in column_names
    return [c for c in column_names if not (from_prompt and c == "prompt")]
