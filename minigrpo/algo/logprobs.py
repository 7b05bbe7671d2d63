"""Log-probabilities of chosen tokens without a full [B, T, V] log-softmax.

Legend: B sequences, T positions, V vocabulary, R = B*T rows.

log p(token) = logit[token] / tau - logsumexp(logits / tau). Gathering one logit per row and
subtracting a row-wise logsumexp, a chunk of rows at a time, keeps the extra memory to a few
chunks instead of a second copy of the logits (2.5 GB for 8 x 512 x 151,936 in float32).
"""

from __future__ import annotations

import torch

# Rows per chunk are chosen so one float32 chunk is about this many bytes; the peak extra memory
# is a small multiple of it (the scaled chunk, logsumexp's temporaries).
CHUNK_BYTES = 64 * 2**20


def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0, chunk_bytes: int = CHUNK_BYTES
) -> torch.Tensor:
    """Log-probability of each given token under softmax(logits / temperature).

    Args:
        logits: [B, T, V], any float dtype; row (b, t) scores token_ids[b, t].
        token_ids: [B, T] long.
        temperature: the sampling temperature; must equal the rollout engine's, or the importance
            ratio compares different distributions.
        chunk_bytes: approximate float32 size of one chunk of rows.

    Returns:
        [B, T] in float32 (float64 if the logits are float64). Differentiable w.r.t. logits.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if tuple(token_ids.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"token_ids has shape {tuple(token_ids.shape)}, expected {tuple(logits.shape[:2])}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, t, v = logits.shape
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    flat = logits.reshape(b * t, v)  # [R, V] (a view for contiguous logits)
    ids = token_ids.reshape(b * t, 1)  # [R, 1]
    rows = max(1, chunk_bytes // (4 * v))
    out = []
    for start in range(0, b * t, rows):
        chunk = flat[start : start + rows].to(out_dtype)  # [r, V]; no copy when already out_dtype
        if temperature != 1.0:
            chunk = chunk / temperature
        chosen = chunk.gather(1, ids[start : start + rows]).squeeze(1)  # [r]
        out.append(chosen - torch.logsumexp(chunk, dim=1))  # [r]
    return torch.cat(out).view(b, t) if out else flat.new_zeros((b, t), dtype=out_dtype)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per row: logsumexp(z) - sum(p * z), z = logits / tau.

    Args:
        logits: [R, V], a chunk of rows (callers chunk: this makes [R, V] temporaries).
    Returns:
        [R] float32 (float64 for float64 logits). Differentiable w.r.t. logits.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # [R, V]
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [R, 1]
    return lse.squeeze(-1) - (torch.exp(z - lse) * z).sum(dim=-1)  # [R]
