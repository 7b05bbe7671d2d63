"""Per-token log-probabilities of completions under a causal LM (policy or reference).

Legend: B sequences, L = longest prompt+completion, T longest completion, H hidden size,
M real completion tokens in the batch (sum of completion lengths), V vocabulary.

Only the M hidden states that predict a completion token go through the LM head (no logits for
prompt positions or padding), a chunk of tokens at a time; with gradients on, each chunk's
logits are recomputed in backward instead of being kept, so no [B, T, V] tensor is ever alive.
A group's shared prompt is run once, not once per completion (`share_prompts`).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from minigrpo.algo import token_logprobs

CHUNK_LOGITS_BYTES = 256 * 2**20


def _chunk_logprobs(head: torch.nn.Module, h: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(h)  # [m, V]
    return token_logprobs(logits.unsqueeze(0), ids.unsqueeze(0), temperature).squeeze(0)  # [m]


def completion_logprobs(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    pad_id: int = 0,
    share_prompts: bool = True,
) -> torch.Tensor:
    """log p(completion token t | prompt, completion[:t]) for every completion.

    Args:
        model: a Hugging Face causal LM (`base_model` gives hidden states, the output embedding
            is the LM head); may be the module inside a DeepSpeed engine.
        prompt_ids, completion_ids: [B] ragged token lists.
        temperature: divide logits by it (the rollout's sampling temperature).
        chunk_tokens: completion tokens per LM-head chunk; None sizes a chunk's float32 logits to
            about CHUNK_LOGITS_BYTES (1,365 tokens at SmolLM2's 49,152 vocabulary, 441 at
            Qwen2.5's 151,936), so peak extra memory does not grow with the batch.
        share_prompts: run each run of consecutive identical prompts (a GRPO group) through the
            model once and let its completions attend to that one KV cache, expanded per
            completion by index_select, so gradients from every completion flow back into the
            shared prompt pass. Same values and gradients as repeating the prompt (tested), for
            ~len(prompt) * (G - 1) fewer tokens per group. Off when gradient checkpointing is on
            (transformers drops the cache then).

    Returns:
        [B, T] float32 (float64 for a float64 model); zeros where the completion has ended.
        Differentiable when grad is enabled.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    for i, p in enumerate(prompt_ids):
        if not p:
            raise ValueError(f"sequence {i} has an empty prompt: nothing predicts its first token")
    device = next(model.parameters()).device
    b = len(prompt_ids)
    t = max((len(c) for c in completion_ids), default=0)
    checkpointing = getattr(model, "is_gradient_checkpointing", False) and model.training
    if share_prompts and not checkpointing:
        hidden = _hidden_shared_prompts(model, prompt_ids, completion_ids, pad_id, device)  # [B, T, H]
        rows, cols = _token_positions(completion_ids)
        src_cols = cols
    else:
        hidden = _hidden_full(model, prompt_ids, completion_ids, pad_id, device)  # [B, L, H]
        rows, cols = _token_positions(completion_ids)
        src_cols = [len(prompt_ids[r]) - 1 + c for r, c in zip(rows, cols)]  # position j predicts j + 1
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    h = hidden[rows_t, torch.tensor(src_cols, dtype=torch.long, device=device)]  # [M, H]
    ids = torch.tensor([completion_ids[r][c] for r, c in zip(rows, cols)], dtype=torch.long, device=device)  # [M]
    out = torch.zeros((b, t), dtype=torch.promote_types(hidden.dtype, torch.float32), device=device)  # [B, T]
    if len(ids):
        lp = head_logprobs(model.get_output_embeddings(), h, ids, temperature, chunk_tokens)  # [M]
        out = out.index_put((rows_t, torch.tensor(cols, dtype=torch.long, device=device)), lp)
    elif torch.is_grad_enabled():
        out = out + 0.0 * hidden.sum()  # every completion empty: keep a graph so backward is a no-op
    return out


def head_logprobs(
    head: torch.nn.Module, h: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0, chunk_tokens: int | None = None
) -> torch.Tensor:
    """log softmax(head(h) / temperature)[ids] for M hidden states h [M, H] and tokens ids [M].

    A chunk of rows at a time; with grad enabled each chunk's logits are recomputed in backward
    (activation checkpointing), so at most one chunk of [chunk, V] logits is alive at once.
    """
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_LOGITS_BYTES // (4 * head.weight.shape[0]))
    pieces = []
    for start in range(0, len(ids), chunk_tokens):
        hc, ic = h[start : start + chunk_tokens], ids[start : start + chunk_tokens]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logprobs, head, hc, ic, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(head, hc, ic, temperature))
    return torch.cat(pieces)  # [M]


def _token_positions(completion_ids: list[list[int]]) -> tuple[list[int], list[int]]:
    """(row, column) of every real completion token, row-major: M entries."""
    rows, cols = [], []
    for i, c in enumerate(completion_ids):
        rows += [i] * len(c)
        cols += range(len(c))
    return rows, cols


def _right_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, length = len(seqs), max(max((len(x) for x in seqs), default=0), 1)
    ids = torch.full((n, length), pad_id, dtype=torch.long)  # [n, L]
    mask = torch.zeros((n, length), dtype=torch.long)  # [n, L]
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids, mask


def _hidden_full(model, prompt_ids, completion_ids, pad_id, device) -> torch.Tensor:
    """Hidden states of prompt + completion, one right-padded row per sequence: [B, L, H]."""
    ids, mask = _right_padded([p + c for p, c in zip(prompt_ids, completion_ids)], pad_id)
    return model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state


def _hidden_shared_prompts(model, prompt_ids, completion_ids, pad_id, device) -> torch.Tensor:
    """[B, T, H]: at column t, the hidden state that predicts completion token t."""
    owner, unique = [], []  # owner[i]: index into `unique` of sequence i's prompt
    for p in prompt_ids:
        if not unique or unique[-1] != p:
            unique.append(p)
        owner.append(len(unique) - 1)
    owner_t = torch.tensor(owner, dtype=torch.long, device=device)  # [B]
    p_ids, p_mask = _right_padded(unique, pad_id)  # [U, Lp]; right padding: no fully masked query row
    p_ids, p_mask = p_ids.to(device), p_mask.to(device)
    out = model.base_model(input_ids=p_ids, attention_mask=p_mask, use_cache=True)
    p_len = p_mask.sum(dim=1)  # [U]
    first = out.last_hidden_state[torch.arange(len(unique), device=device), p_len - 1]  # [U, H] predicts token 0
    h_first = first.index_select(0, owner_t).unsqueeze(1)  # [B, 1, H]
    t = max((len(c) for c in completion_ids), default=0)
    if t <= 1:
        return h_first[:, :t]
    cache = out.past_key_values
    cache.reorder_cache(owner_t)  # each layer's K/V: [U, h, Lp, d] -> [B, h, Lp, d], differentiable
    c_ids, c_mask = _right_padded([c[:-1] for c in completion_ids], pad_id)  # the last token predicts nothing
    c_ids, c_mask = c_ids[:, : t - 1].to(device), c_mask[:, : t - 1].to(device)  # [B, T-1]
    positions = p_len.index_select(0, owner_t).unsqueeze(1) + torch.arange(t - 1, device=device)  # [B, T-1]
    rest = model.base_model(
        input_ids=c_ids, attention_mask=torch.cat([p_mask.index_select(0, owner_t), c_mask], dim=1),
        position_ids=positions, past_key_values=cache, use_cache=True,
    ).last_hidden_state  # [B, T-1, H]
    return torch.cat([h_first, rest], dim=1)  # [B, T, H]
