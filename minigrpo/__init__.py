"""minigrpo: GRPO in pure PyTorch, with vLLM rollouts and a DeepSpeed-wrapped policy.

    from minigrpo import Config, train
"""

from minigrpo.config import Config, ConfigError


def train(*args, **kwargs):
    """See `minigrpo.trainer.train` (imported on first use: it pulls in DeepSpeed and vLLM)."""
    from minigrpo.trainer import train as _train

    return _train(*args, **kwargs)


__all__ = ["Config", "ConfigError", "train"]
__version__ = "0.1.0"
