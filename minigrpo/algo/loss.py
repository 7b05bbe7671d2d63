"""The GRPO objective: clipped importance ratio, per-token KL to a frozen reference, three
normalizations.

Legend: B sequences in the (micro-)batch, T completion tokens (padded; `mask` marks real ones).

Per token (all [B, T]):
    ratio     = exp(logprobs - old_logprobs)
    surrogate = min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    kl        = exp(ref - logprobs) - (ref - logprobs) - 1          (k3 estimator, >= 0)
    loss      = -(surrogate - beta * kl)

The three loss types differ only in the weight each masked token gets in the final sum, so they
are one table of weights (`_token_weights`), not three code paths.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


def _token_weights(mask: torch.Tensor, loss_type: str, max_completion_length: int | None) -> torch.Tensor:
    """[B, T] weights w so that loss = sum(w * per_token_loss).

    grpo    (DeepSeekMath): mean over sequences of each sequence's token mean -> 1 / (B * len_b)
    bnpo    (DAPO, token-level): one mean over all masked tokens of the batch -> 1 / sum(mask)
    dr_grpo (Dr. GRPO): a constant denominator, independent of lengths -> 1 / (B * max_len)
    A sequence with no masked token (an empty completion) contributes 0 but still counts in B.
    """
    b = mask.shape[0]
    if loss_type == "grpo":
        lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)  # [B, 1]
        return mask / (lengths * b)
    if loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length < 1:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length (a positive int)")
        return mask / (b * max_completion_length)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def _check_shapes(logprobs, old_logprobs, ref_logprobs, advantages, mask) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    b, t = logprobs.shape
    for name, x in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("mask", mask)):
        if x is not None and tuple(x.shape) != (b, t):
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected logprobs' shape {(b, t)}")
    if tuple(advantages.shape) != (b,):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected [B] = {(b,)}")


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.04,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO loss of one (micro-)batch.

    Args:
        logprobs: [B, T] log-probabilities of the sampled tokens under the current policy (grad).
        old_logprobs: [B, T] under the policy that sampled them, or None when on-policy (the ratio
            is then exactly 1 in value, but its gradient is that of exp(logprobs - sg(logprobs))).
        ref_logprobs: [B, T] under the frozen reference, or None (only with beta == 0).
        advantages: [B], one per sequence.
        mask: [B, T] bool or float, 1 for completion tokens that count.
        beta: KL coefficient. eps_low / eps_high: clip range (eps_high None -> eps_low; larger is
            DAPO's clip-higher). loss_type: "grpo" | "bnpo" | "dr_grpo" (see `_token_weights`).
        max_completion_length: the denominator's length for "dr_grpo".

    Returns:
        (loss, metrics): scalar loss in the input dtype; metrics are plain floats: `pg_loss` and
        `kl_loss` (the two parts of `loss`, weighted like it), `kl` (masked token mean),
        `clip_low`, `clip_high`, `clip_fraction` (fractions of masked tokens where clipping
        changed the objective), `ratio_mean`, `ratio_max`.
    """
    _check_shapes(logprobs, old_logprobs, ref_logprobs, advantages, mask)
    if ref_logprobs is None and beta != 0:
        raise ValueError(f"ref_logprobs is None but beta={beta}: the KL term needs the reference")
    eps_high = eps_low if eps_high is None else eps_high
    m = mask.to(logprobs.dtype)  # [B, T]
    w = _token_weights(m, loss_type, max_completion_length)  # [B, T]

    old = logprobs.detach() if old_logprobs is None else old_logprobs
    ratio = torch.exp(logprobs - old)  # [B, T]
    a = advantages.to(logprobs.dtype).unsqueeze(1)  # [B, 1]
    surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)  # [B, T]
    pg_loss = -(surrogate * w).sum()

    if ref_logprobs is None:
        kl = torch.zeros_like(logprobs)  # [B, T]
    else:
        d = ref_logprobs - logprobs  # [B, T]
        kl = torch.exp(d) - d - 1  # [B, T]
    kl_loss = beta * (kl * w).sum()
    loss = pg_loss + kl_loss

    with torch.no_grad():
        n_tok = m.sum().clamp(min=1)
        clip_low = ((ratio < 1 - eps_low) & (a < 0)).to(m.dtype) * m  # [B, T]
        clip_high = ((ratio > 1 + eps_high) & (a > 0)).to(m.dtype) * m  # [B, T]
        masked_ratio = torch.where(m > 0, ratio, torch.full_like(ratio, float("-inf")))
        metrics = {
            "loss": loss.item(),
            "pg_loss": pg_loss.item(),
            "kl_loss": kl_loss.item(),
            "kl": ((kl * m).sum() / n_tok).item(),
            "clip_low": (clip_low.sum() / n_tok).item(),
            "clip_high": (clip_high.sum() / n_tok).item(),
            "clip_fraction": ((clip_low + clip_high).sum() / n_tok).item(),
            "ratio_mean": ((ratio * m).sum() / n_tok).item(),
            "ratio_max": masked_ratio.max().item() if m.any() else 1.0,
        }
    return loss, metrics
