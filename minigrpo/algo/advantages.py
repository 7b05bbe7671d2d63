"""Group-relative advantages: GRPO's replacement for a value function.

Legend: P prompts, G generations per prompt (group_size), N = P*G completions, prompt-major
(the G completions of prompt i are rewards[i*G : (i+1)*G]).
"""

from __future__ import annotations

import torch

SCALES = ("group", "batch", "none")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4,
    batch_std: float | None = None,
) -> torch.Tensor:
    """Advantage of each completion relative to the other completions of its prompt.

    Args:
        rewards: [N] float, prompt-major.
        group_size: G, completions per prompt (>= 2).
        scale: how the centred reward is scaled:
            "group": (r - mean_group) / (std_group + eps), std unbiased (Bessel, divides by G-1),
                as DeepSeekMath and TRL do.
            "batch": (r - mean_group) / (std_batch + eps), std unbiased over all rewards of the
                step: `batch_std` when the step spans several ranks (`pooled_std` of their sums),
                else over these N rewards.
            "none":  r - mean_group (Dr. GRPO: no scaling, so no eps either).
        eps: added to the standard deviation, never to the numerator.

    Returns:
        [N] advantages, same dtype as `rewards`. A group whose rewards are all equal gets exactly
        zero advantages (never NaN, never a rounding residue divided by eps).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a float tensor, got {rewards.dtype}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if group_size < 2:
        raise ValueError(
            f"group_size must be >= 2, got {group_size}: GRPO compares completions of the same "
            "prompt, and a group of one has nothing to compare with (its advantage is always 0)"
        )
    n = rewards.numel()
    if n % group_size:
        raise ValueError(f"{n} rewards is not a whole number of groups of size {group_size}")

    r = rewards.view(n // group_size, group_size)  # [P, G]
    mean = r.mean(dim=1, keepdim=True)  # [P, 1]
    flat = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)  # [P, 1] all rewards equal
    centred = torch.where(flat, torch.zeros_like(r), r - mean)  # [P, G]

    if scale == "none":
        return centred.view(n)
    if scale == "group":
        std = r.std(dim=1, keepdim=True, unbiased=True)  # [P, 1]
    else:
        std = rewards.std(unbiased=True) if batch_std is None else rewards.new_tensor(batch_std)  # []
    return (centred / (std + eps)).view(n)  # [N]


def pooled_std(count: float, total: float, total_sq: float) -> float:
    """Unbiased standard deviation of values known only by their count, sum and sum of squares
    (added over ranks in float64): sqrt((sum x^2 - (sum x)^2 / n) / (n - 1))."""
    if count < 2:
        return 0.0
    return max(total_sq - total * total / count, 0.0) ** 0.5 / (count - 1) ** 0.5


def spread_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[P] bool: the groups whose rewards [N] (prompt-major) are not all equal. The others have
    all-zero advantages whatever the scaling, and teach nothing (DAPO's dynamic sampling drops them)."""
    r = rewards.view(-1, group_size)  # [P, G]
    return r.amax(dim=1) != r.amin(dim=1)  # [P]
