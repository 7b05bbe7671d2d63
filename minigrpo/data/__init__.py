"""Data: Countdown tasks (hub, local file, or offline generator) and prompt rendering/tokenizing.

To train on your own dataset, see `minigrpo.data.prompts`: a `prompt` (or `messages`) column plus
any columns your reward functions take as keyword arguments.

The Countdown loaders (`load_countdown`, ...) are imported on first use: they need `datasets` and
`pyarrow`, which training on a dataset you built yourself does not (the GPU check runs without them).
"""

from minigrpo.data.generate import generate_countdown
from minigrpo.data.heldout import HELDOUT_SETS, heldout_keys, load_heldout
from minigrpo.data.prompts import R1_COUNTDOWN, PromptTemplate, render_prompt, tokenize_prompts

_COUNTDOWN = ("GENERATED_SIZE", "HUB_DATASET", "load_countdown", "load_recipe_tasks", "normalize_countdown",
              "read_countdown_file")

__all__ = [*_COUNTDOWN, "HELDOUT_SETS", "PromptTemplate", "heldout_keys", "load_heldout", "R1_COUNTDOWN", "generate_countdown", "render_prompt", "tokenize_prompts"]


def __getattr__(name: str):
    if name in _COUNTDOWN:
        from minigrpo.data import countdown

        return getattr(countdown, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
