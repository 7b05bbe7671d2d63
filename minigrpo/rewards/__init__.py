"""Rewards: the reward protocol and its runner, and the Countdown rewards.

A reward is any callable TRL could call, `fn(prompts=, completions=, completion_ids=, trainer_state=,
**columns) -> list[float | None]`, by keyword (see `runner`); `score_completions` runs a weighted list
of them under a hard time limit and fails loudly.
"""

from minigrpo.rewards.countdown import (
    closeness_reward,
    completion_text,
    equation_reward,
    extract_answer,
    format_reward,
    is_correct_equation,
    is_well_formatted,
    numbers_reward,
    tag_reward,
    think_arithmetic,
    think_arithmetic_reward,
)
from minigrpo.rewards.expression import InvalidExpression, evaluate_answer
from minigrpo.rewards.isolation import RewardError
from minigrpo.rewards.runner import (
    REWARD_ARGUMENTS,
    Reward,
    RewardScores,
    RewardWarning,
    repeat_columns,
    score_completions,
    trl_prompts_and_completions,
)

__all__ = [
    "REWARD_ARGUMENTS",
    "InvalidExpression",
    "Reward",
    "RewardError",
    "RewardScores",
    "RewardWarning",
    "closeness_reward",
    "completion_text",
    "equation_reward",
    "evaluate_answer",
    "extract_answer",
    "format_reward",
    "is_correct_equation",
    "is_well_formatted",
    "numbers_reward",
    "repeat_columns",
    "score_completions",
    "tag_reward",
    "think_arithmetic",
    "think_arithmetic_reward",
    "trl_prompts_and_completions",
]
