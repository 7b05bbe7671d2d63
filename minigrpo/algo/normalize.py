"""How much each token counts in a step's loss, and when a micro-batch's loss is provably zero.

Legend: B sequences in a micro-batch, T its longest completion; S sequences and K completion
tokens in the whole step (every micro-batch of every rank).

A step's loss is one sum over every token of the step, sum(w * per_token_loss), with the weights
of the loss type taken over the whole step:

    grpo    (DeepSeekMath): mean over sequences of each sequence's token mean -> w = 1 / (S * len_b)
    bnpo    (DAPO, token-level): one mean over all tokens of the step     -> w = 1 / K
    dr_grpo (Dr. GRPO): a constant denominator                            -> w = 1 / (S * max_len)

Each micro-batch's loss is its share of that sum, so however the step is cut into micro-batches
and ranks the update is the same (tested with 1 vs 4 micro-batches and 1 vs 2 ranks). The
engine undoes DeepSpeed's mean over micro-batches and ranks (`PolicyEngine.backward`).
A sequence with no token (an empty completion) contributes 0 but still counts in S.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


def token_weights(
    mask: torch.Tensor,
    loss_type: str,
    max_completion_length: int | None = None,
    step_sequences: float | None = None,
    step_tokens: float | None = None,
) -> torch.Tensor:
    """[B, T] weights w of a micro-batch's tokens in the step's loss (see the module docstring).

    Args:
        mask: [B, T] float, 1 for completion tokens that count.
        loss_type: "grpo" | "bnpo" | "dr_grpo".
        max_completion_length: the dr_grpo denominator's length.
        step_sequences: S, sequences in the whole step (None: this micro-batch is the step, S = B).
        step_tokens: K, completion tokens in the whole step (None: K = mask.sum()).
    """
    s = mask.shape[0] if step_sequences is None else step_sequences
    if loss_type == "grpo":
        lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)  # [B, 1]
        return mask / (lengths * s)  # [B, T]
    if loss_type == "bnpo":
        k = mask.sum().clamp(min=1) if step_tokens is None else max(step_tokens, 1.0)
        return mask / k  # [B, T]
    if loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length < 1:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length (a positive int)")
        return mask / (s * max_completion_length)  # [B, T]
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def loss_is_zero(advantages: torch.Tensor, beta: float, entropy_coef: float) -> bool:
    """True when a micro-batch's loss and its gradient are exactly 0 whatever the policy: every
    advantage [B] is 0 (so every policy-gradient term, clipped, corrected or not, is 0) and the
    loss has no term that does not depend on the advantage (no KL, no entropy bonus). The trainer
    may then skip its forward and backward."""
    return beta == 0 and entropy_coef == 0 and not bool(advantages.any())
