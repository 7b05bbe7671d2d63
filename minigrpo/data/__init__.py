"""Data: Countdown tasks (hub, local file, or offline generator) and prompt rendering/tokenizing.

To train on your own dataset, see `minigrpo.data.prompts`: a `prompt` (or `messages`) column plus
any columns your reward functions take as keyword arguments.
"""

from minigrpo.data.countdown import (
    GENERATED_SIZE,
    HUB_DATASET,
    load_countdown,
    normalize_countdown,
    read_countdown_file,
)
from minigrpo.data.generate import generate_countdown
from minigrpo.data.prompts import R1_COUNTDOWN, PromptTemplate, render_prompt, tokenize_prompts

__all__ = [
    "GENERATED_SIZE",
    "HUB_DATASET",
    "PromptTemplate",
    "R1_COUNTDOWN",
    "generate_countdown",
    "load_countdown",
    "normalize_countdown",
    "read_countdown_file",
    "render_prompt",
    "tokenize_prompts",
]
