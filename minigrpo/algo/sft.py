"""The supervised warm-up's loss: mean negative log-likelihood of the known completions' tokens."""

from __future__ import annotations

import torch


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean negative log-likelihood over a batch: every completion token weighs the same, so
    a long solution counts more than a short one (as in ordinary causal-LM fine-tuning).

    Args:
        logprobs: [B, T] log p(token t | prompt, completion[:t]) (`scoring.completion_logprobs`).
        mask: [B, T] 1 for a real completion token, 0 for padding.

    Returns:
        (loss: scalar, metrics: `nll` (the loss), `tokens` (how many it averages) and
        `mean_token_prob`, the mean probability given to the right token).
    """
    if logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and mask {tuple(mask.shape)} differ")
    mask = mask.to(logprobs.dtype)
    tokens = mask.sum()  # scalar
    if tokens.item() == 0:
        raise ValueError("no completion tokens in the batch")
    loss = -(logprobs * mask).sum() / tokens  # scalar
    with torch.no_grad():
        p = (logprobs.exp() * mask).sum() / tokens
    return loss, {"nll": loss.item(), "tokens": tokens.item(), "mean_token_prob": p.item()}
