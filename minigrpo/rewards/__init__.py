"""Rewards: the reward protocol and its runner, and the Countdown rewards.

A reward is any callable `fn(completions, **columns) -> list[float | None]` (TRL's signature);
`score_completions` runs a weighted list of them under a hard time limit and fails loudly.
"""

from minigrpo.rewards.countdown import (
    equation_reward,
    extract_answer,
    format_reward,
    is_correct_equation,
    is_well_formatted,
    tag_reward,
)
from minigrpo.rewards.expression import InvalidExpression, evaluate_answer
from minigrpo.rewards.isolation import RewardError
from minigrpo.rewards.runner import Reward, RewardScores, RewardWarning, repeat_columns, score_completions

__all__ = [
    "InvalidExpression",
    "Reward",
    "RewardError",
    "RewardScores",
    "RewardWarning",
    "equation_reward",
    "evaluate_answer",
    "extract_answer",
    "format_reward",
    "is_correct_equation",
    "is_well_formatted",
    "repeat_columns",
    "score_completions",
    "tag_reward",
]
