"""The GRPO objective: clipped importance ratio (per token, or per sequence as in GSPO), per-token
KL to a frozen reference, an optional entropy bonus, an optional correction for the rollout
engine's sampling mismatch, and the step's token weights (`minigrpo.algo.normalize`).

Legend: B sequences in the (micro-)batch, T completion tokens (padded; `mask` marks real ones),
len_b the real tokens of sequence b.

Per token (all [B, T]):
    ratio     = exp(logprobs - old_logprobs)                                   (token level)
              = exp(sum_t (logprobs - old_logprobs) / len_b), same for all of b (sequence level, GSPO)
    surrogate = min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    c         = the rollout correction's weight (1 without one; see below)
    kl        = exp(ref - logprobs) - (ref - logprobs) - 1                      (k3 estimator, >= 0)
    loss      = sum(w * (-(c * surrogate) + beta * kl - entropy_coef * entropy))

Rollout correction. The engine samples from pi_engine, which differs from the trainer's pi_old by
kernel noise (bf16, other reductions); rho = pi_old / pi_engine per token (detached):
    token_truncate: c = min(rho, cap)                              (truncated importance sampling)
    sequence_mask:  c = 1 if 1/cap <= prod_t rho <= cap else 0, for all tokens of the sequence
It weights the policy-gradient term only (the KL is a regulariser of the trainer's own policy).
"""

from __future__ import annotations

import math

import torch

from minigrpo.algo.normalize import LOSS_TYPES, token_weights

IS_LEVELS = ("token", "sequence")
CORRECTIONS = ("none", "token_truncate", "sequence_mask")
__all__ = ["grpo_loss", "loss_metric_names", "LOSS_TYPES", "IS_LEVELS", "CORRECTIONS"]


def _check_shapes(logprobs, advantages, **tensors) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    b, t = logprobs.shape
    for name, x in tensors.items():
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
    weights: torch.Tensor | None = None,
    importance_sampling_level: str = "token",
    engine_logprobs: torch.Tensor | None = None,
    rollout_correction: str = "none",
    correction_cap: float = 2.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO loss of one (micro-)batch.

    Args:
        logprobs: [B, T] log-probabilities of the sampled tokens under the current policy (grad).
        old_logprobs: [B, T] under the policy before this step's updates, or None when on-policy
            (the ratio is then exactly 1 in value, with the gradient of exp(logprobs - sg(logprobs))).
        ref_logprobs: [B, T] under the frozen reference, or None (only with beta == 0).
        advantages: [B], one per sequence.
        mask: [B, T] bool or float, 1 for completion tokens that count.
        beta: KL coefficient. eps_low / eps_high: the clip range of the ratio at its level
            (eps_high None -> eps_low; larger is DAPO's clip-higher; GSPO's sequence ratios use a
            range ~1e3 times narrower). loss_type: see `minigrpo.algo.normalize`.
        max_completion_length: the denominator's length for "dr_grpo".
        weights: [B, T] the tokens' weights in the step's loss (`normalize.token_weights` over the
            whole step); None: this micro-batch is the whole step.
        importance_sampling_level: "token" (GRPO/PPO) or "sequence" (GSPO: one ratio per sequence,
            the geometric mean of its token ratios; only with loss_type "grpo", whose weights give
            every sequence the same total weight, as GSPO's objective does).
        engine_logprobs: [B, T] the rollout engine's log-probs of the sampled tokens (needed by a
            rollout correction).
        rollout_correction: "none" | "token_truncate" | "sequence_mask"; correction_cap: its C.
        entropy: [B, T] the policy's entropy at each position (grad, for entropy_coef != 0), or None.
        entropy_coef: weight of the entropy bonus (subtracted from the loss).

    Returns:
        (loss, metrics): scalar loss in the input dtype; metrics are plain floats: `pg_loss`,
        `kl_loss`, `entropy_loss` (the parts of `loss`), `kl` (masked token mean), `clip_low`,
        `clip_high`, `clip_fraction` (fractions of masked tokens where clipping changed the
        objective; a sequence-level ratio counts for each of its tokens), `ratio_mean`,
        `ratio_max` (over tokens, or over sequences at the sequence level); with `entropy`,
        `entropy` (masked token mean); with a correction, `rollout_is/weight_mean` (mean c over
        tokens), `rollout_is/ratio_max` (largest rho, or sequence product), and
        `rollout_is/truncated_fraction` (tokens with rho > cap) or `rollout_is/masked_fraction`
        (sequences dropped).
    """
    _check_shapes(logprobs, advantages, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, mask=mask,
                  weights=weights, engine_logprobs=engine_logprobs, entropy=entropy)
    if ref_logprobs is None and beta != 0:
        raise ValueError(f"ref_logprobs is None but beta={beta}: the KL term needs the reference")
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, got {importance_sampling_level!r}")
    if importance_sampling_level == "sequence" and loss_type != "grpo":
        raise ValueError(f"importance_sampling_level='sequence' (GSPO) needs loss_type='grpo', got {loss_type!r}: "
                         "the other loss types weight a sequence's shared ratio by its length")
    if rollout_correction not in CORRECTIONS:
        raise ValueError(f"rollout_correction must be one of {CORRECTIONS}, got {rollout_correction!r}")
    if rollout_correction != "none" and (engine_logprobs is None or not correction_cap > 1):
        raise ValueError("a rollout correction needs engine_logprobs and correction_cap > 1")
    if entropy_coef != 0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs the entropy")
    eps_high = eps_low if eps_high is None else eps_high
    m = mask.to(logprobs.dtype)  # [B, T]
    w = token_weights(m, loss_type, max_completion_length) if weights is None else weights.to(logprobs.dtype)  # [B, T]
    has_tokens = m.sum(dim=1) > 0  # [B]

    old = logprobs.detach() if old_logprobs is None else old_logprobs
    log_ratio = (logprobs - old) * m  # [B, T]
    if importance_sampling_level == "token":
        ratio = torch.exp(log_ratio)  # [B, T]
        units, unit_mask = ratio, m  # the ratios the metrics describe
    else:
        seq_ratio = torch.exp(log_ratio.sum(dim=1) / m.sum(dim=1).clamp(min=1))  # [B]: geometric mean of token ratios
        ratio = seq_ratio.unsqueeze(1).expand_as(m)  # [B, T]
        units, unit_mask = seq_ratio, has_tokens.to(m.dtype)
    a = advantages.to(logprobs.dtype).unsqueeze(1)  # [B, 1]
    surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a)  # [B, T]

    corr_metrics = {}
    if rollout_correction == "none":
        c = torch.ones_like(m)  # [B, T]
    else:
        with torch.no_grad():
            log_rho = (old.detach() - engine_logprobs.to(logprobs.dtype)) * m  # [B, T]
            if rollout_correction == "token_truncate":
                rho = torch.exp(log_rho)  # [B, T]
                c = rho.clamp(max=correction_cap)  # [B, T]
                corr_metrics = {"rollout_is/ratio_max": _masked_max(rho, m),
                                "rollout_is/truncated_fraction": _masked_mean((rho > correction_cap).to(m.dtype), m)}
            else:
                log_seq = log_rho.sum(dim=1)  # [B]: log of the product of token ratios
                keep = (log_seq.abs() <= math.log(correction_cap)).to(m.dtype)  # [B]
                c = keep.unsqueeze(1).expand_as(m)  # [B, T]
                corr_metrics = {"rollout_is/ratio_max": _masked_max(torch.exp(log_seq), has_tokens.to(m.dtype)),
                                "rollout_is/masked_fraction": _masked_mean(1 - keep, has_tokens.to(m.dtype))}
            corr_metrics["rollout_is/weight_mean"] = _masked_mean(c, m)
    pg_loss = -(c * surrogate * w).sum()

    if ref_logprobs is None:
        kl = torch.zeros_like(logprobs)  # [B, T]
    else:
        d = ref_logprobs - logprobs  # [B, T]
        kl = torch.exp(d) - d - 1  # [B, T]
    kl_loss = beta * (kl * w).sum()
    # Only with a coefficient: otherwise the entropy stays out of the graph, and the LM head's
    # backward does no entropy work (it receives no gradient for it).
    entropy_loss = -entropy_coef * (entropy * w).sum() if entropy_coef != 0 else logprobs.new_zeros(())
    loss = pg_loss + kl_loss + entropy_loss

    with torch.no_grad():
        clip_low = ((ratio < 1 - eps_low) & (a < 0)).to(m.dtype) * m  # [B, T]
        clip_high = ((ratio > 1 + eps_high) & (a > 0)).to(m.dtype) * m  # [B, T]
        metrics = {
            "loss": loss.item(),
            "pg_loss": pg_loss.item(),
            "kl_loss": kl_loss.item(),
            "entropy_loss": entropy_loss.item(),
            "kl": _masked_mean(kl, m),
            "clip_low": _masked_mean(clip_low, m),
            "clip_high": _masked_mean(clip_high, m),
            "clip_fraction": _masked_mean(clip_low + clip_high, m),
            "ratio_mean": _masked_mean(units, unit_mask),
            "ratio_max": _masked_max(units, unit_mask) if m.any() else 1.0,
            **corr_metrics,
        }
        if entropy is not None:
            metrics["entropy"] = _masked_mean(entropy, m)
    return loss, metrics


LOSS_TERMS = ("loss", "pg_loss", "kl_loss", "entropy_loss")  # a micro-batch's share of the step's: they add up


def loss_metric_names(rollout_correction: str = "none", entropy: bool = False) -> tuple[str, ...]:
    """The metric names `grpo_loss` returns with these options (see its docstring)."""
    names = ["loss", "pg_loss", "kl_loss", "entropy_loss", "kl", "clip_low", "clip_high", "clip_fraction",
             "ratio_mean", "ratio_max"]
    if rollout_correction != "none":
        names += ["rollout_is/ratio_max", "rollout_is/weight_mean",
                  "rollout_is/truncated_fraction" if rollout_correction == "token_truncate" else "rollout_is/masked_fraction"]
    return tuple(names + ["entropy"] * entropy)


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> float:
    return ((x * m).sum() / m.sum().clamp(min=1)).item()


def _masked_max(x: torch.Tensor, m: torch.Tensor) -> float:
    return torch.where(m > 0, x, torch.full_like(x, float("-inf"))).max().item() if m.any() else float("nan")
