"""GRPO math as pure torch functions: tensors in, tensors (and plain-float metrics) out."""

from minigrpo.algo.advantages import SCALES, group_advantages, pooled_std, spread_groups
from minigrpo.algo.logprobs import token_entropy, token_logprobs
from minigrpo.algo.loss import CORRECTIONS, IS_LEVELS, LOSS_TERMS, LOSS_TYPES, grpo_loss, loss_metric_names
from minigrpo.algo.normalize import loss_is_zero, token_weights
from minigrpo.algo.sft import sft_loss

__all__ = ["group_advantages", "pooled_std", "spread_groups", "grpo_loss", "loss_metric_names", "token_logprobs", "token_entropy", "token_weights",
           "loss_is_zero", "sft_loss", "SCALES", "LOSS_TERMS", "LOSS_TYPES", "IS_LEVELS", "CORRECTIONS"]
