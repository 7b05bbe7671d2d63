"""GRPO math as pure torch functions: tensors in, tensors (and plain-float metrics) out."""

from minigrpo.algo.advantages import SCALES, group_advantages
from minigrpo.algo.logprobs import token_logprobs
from minigrpo.algo.loss import LOSS_TYPES, grpo_loss

__all__ = ["group_advantages", "grpo_loss", "token_logprobs", "SCALES", "LOSS_TYPES"]
