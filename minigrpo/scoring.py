"""Per-token log-probabilities of completions under a causal LM (policy or reference).

Legend: B sequences, L = longest prompt+completion, T longest completion, H hidden size,
M real completion tokens in the batch (sum of completion lengths), V vocabulary.

Only the M hidden states that predict a completion token go through the LM head (no logits for
prompt positions or padding), a chunk of tokens at a time; with gradients on, each chunk's
logits are recomputed in backward instead of being kept, so no [B, T, V] tensor is ever alive.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from minigrpo.algo import token_logprobs


def _chunk_logprobs(head: torch.nn.Module, h: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(h)  # [m, V]
    return token_logprobs(logits.unsqueeze(0), ids.unsqueeze(0), temperature).squeeze(0)  # [m]


def completion_logprobs(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
    pad_id: int = 0,
) -> torch.Tensor:
    """log p(completion token t | prompt, completion[:t]) for every completion.

    Args:
        model: a Hugging Face causal LM (`base_model` gives hidden states, the output embedding
            is the LM head); may be the module inside a DeepSpeed engine.
        prompt_ids, completion_ids: [B] ragged token lists.
        temperature: divide logits by it (the rollout's sampling temperature).

    Returns:
        [B, T] float32 (float64 for a float64 model); zeros where the completion has ended.
        Differentiable when grad is enabled.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    device = next(model.parameters()).device
    b = len(prompt_ids)
    t = max((len(c) for c in completion_ids), default=0)
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    input_ids = torch.full((b, max(lengths)), pad_id, dtype=torch.long)  # [B, L], right-padded
    attention = torch.zeros((b, max(lengths)), dtype=torch.long)  # [B, L]
    rows, src_cols, dst_cols, targets = [], [], [], []
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        if not p:
            raise ValueError(f"sequence {i} has an empty prompt: nothing predicts its first token")
        input_ids[i, : lengths[i]] = torch.tensor(p + c, dtype=torch.long)
        attention[i, : lengths[i]] = 1
        rows += [i] * len(c)
        src_cols += range(len(p) - 1, len(p) - 1 + len(c))  # position j predicts token j + 1
        dst_cols += range(len(c))
        targets += c

    hidden = model.base_model(
        input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False
    ).last_hidden_state  # [B, L, H]
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    h = hidden[rows_t, torch.tensor(src_cols, dtype=torch.long, device=device)]  # [M, H]
    ids = torch.tensor(targets, dtype=torch.long, device=device)  # [M]
    head = model.get_output_embeddings()
    pieces = []
    for start in range(0, len(targets), chunk_tokens):
        hc, ic = h[start : start + chunk_tokens], ids[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logprobs, head, hc, ic, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(head, hc, ic, temperature))
    out_dtype = torch.promote_types(hidden.dtype, torch.float32)
    out = torch.zeros((b, t), dtype=out_dtype, device=device)  # [B, T]
    if pieces:
        out = out.index_put((rows_t, torch.tensor(dst_cols, dtype=torch.long, device=device)), torch.cat(pieces))
    return out
