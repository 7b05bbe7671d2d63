"""Per-token log-probabilities of completions under a causal LM (policy or reference).

Legend: B sequences, L = longest prompt+completion, T longest completion, H hidden size,
M real completion tokens in the batch (sum of completion lengths), V vocabulary.

Only the M hidden states that predict a completion token go through the LM head (no logits for
prompt positions or padding), a chunk of tokens at a time; with gradients on, each chunk's
logits are recomputed in backward instead of being kept, so no [B, T, V] tensor is ever alive.
A group's shared prompt is run once, not once per completion (`share_prompts`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from minigrpo.algo import token_entropy, token_logprobs

CHUNK_LOGITS_BYTES = 256 * 2**20


def completion_logprobs(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    pad_id: int = 0,
    share_prompts: bool = True,
    gathered: Callable | None = None,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(completion token t | prompt, completion[:t]) for every completion.

    Args:
        model: a Hugging Face causal LM (`base_model` gives hidden states, the output embedding
            is the LM head); may be the module inside a DeepSpeed engine.
        prompt_ids, completion_ids: [B] ragged token lists.
        temperature: divide logits by it (the rollout's sampling temperature).
        chunk_tokens: completion tokens per LM-head chunk; None sizes a chunk's float32 logits to
            about CHUNK_LOGITS_BYTES from the config's vocabulary (1,365 tokens at SmolLM2's
            49,152, 441 at Qwen2.5's 151,936), so peak extra memory does not grow with the batch.
        share_prompts: run each run of consecutive identical prompts (a GRPO group) through the
            model once and let its completions attend to that one KV cache, expanded per
            completion by index_select, so gradients from every completion flow back into the
            shared prompt pass. Same values and gradients as repeating the prompt (tested), for
            ~len(prompt) * (G - 1) fewer tokens per group. Works with gradient checkpointing (see
            `_hidden_shared_prompts`); off for caches other than transformers' plain DynamicLayer.
        gathered: makes parameters whole for the LM head (see `head_logprobs`); DeepSpeed ZeRO-3
            policies pass `PolicyEngine.gathered`; None for parameters that are whole already.
        with_entropy: also return the entropy of softmax(logits / temperature) at each completion
            position, from the same chunks of logits (never a [B, T, V] tensor).

    Returns:
        [B, T] float32 (float64 for a float64 model); zeros where the completion has ended.
        With `with_entropy`, a pair (log-probs, entropy), both [B, T]. Differentiable when grad is
        enabled.
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    for i, p in enumerate(prompt_ids):
        if not p:
            raise ValueError(f"sequence {i} has an empty prompt: nothing predicts its first token")
    device = next(model.parameters()).device
    b = len(prompt_ids)
    t = max((len(c) for c in completion_ids), default=0)
    hidden = _hidden_shared_prompts(model, prompt_ids, completion_ids, pad_id, device) if share_prompts else None
    rows, cols = _token_positions(completion_ids)
    if hidden is not None:  # [B, T, H]: column t predicts completion token t
        src_cols = cols
    else:
        hidden = _hidden_full(model, prompt_ids, completion_ids, pad_id, device)  # [B, L, H]
        src_cols = [len(prompt_ids[r]) - 1 + c for r, c in zip(rows, cols)]  # position j predicts j + 1
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    h = hidden[rows_t, torch.tensor(src_cols, dtype=torch.long, device=device)]  # [M, H]
    ids = torch.tensor([completion_ids[r][c] for r, c in zip(rows, cols)], dtype=torch.long, device=device)  # [M]
    out = torch.zeros((b, t), dtype=torch.promote_types(hidden.dtype, torch.float32), device=device)  # [B, T]
    ent = torch.zeros_like(out)  # [B, T]
    # The head runs (and, under ZeRO-3, gathers its weight) even for M = 0 tokens: the collectives
    # must not depend on this rank's data; its output then keeps a graph, so backward is a no-op.
    if chunk_tokens is None:  # the config's vocabulary: a ZeRO-3 partitioned head weight has shape (0,)
        chunk_tokens = max(1, CHUNK_LOGITS_BYTES // (4 * model.config.get_text_config().vocab_size))
    lp, e = head_logprobs(model.get_output_embeddings(), h, ids, temperature, chunk_tokens, gathered,
                          with_entropy=True) if with_entropy else (
        head_logprobs(model.get_output_embeddings(), h, ids, temperature, chunk_tokens, gathered), None)  # [M]
    where = (rows_t, torch.tensor(cols, dtype=torch.long, device=device))
    out = out.index_put(where, lp)
    ent = ent.index_put(where, e) if with_entropy else ent
    return (out, ent) if with_entropy else out


def head_logprobs(
    head: torch.nn.Module,
    h: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    gathered: Callable | None = None,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(head(h) / temperature)[ids] for M hidden states h [M, H] and tokens ids [M]
    (and, `with_entropy`, the entropy [M] of each row's softmax(head(h) / temperature)).

    `head`: the model's output Linear (weight [V, H], optional bias [V]). A chunk of rows at a
    time, in forward and in backward (which recomputes each chunk's logits), so at most one chunk
    of [chunk, V] logits exists at once. `gathered(params)`: a context manager that makes
    parameters whole, for DeepSpeed ZeRO-3, which keeps them partitioned outside their module's
    forward (`PolicyEngine.gathered`; None: they are whole); the head's weight is gathered once for the forward and once
    for the backward, however many chunks there are. chunk_tokens None: about CHUNK_LOGITS_BYTES
    of float32 logits per chunk.
    """
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_LOGITS_BYTES // (4 * head.out_features))  # out_features: whole even under ZeRO-3
    gathered = gathered or (lambda params: nullcontext())
    params = [p for p in (head.weight, head.bias) if p is not None]
    with gathered(params):
        lp, ent = _ChunkedHead.apply(h, ids, temperature, chunk_tokens, gathered, with_entropy, head.weight, head.bias)
    return (lp, ent) if with_entropy else lp  # [M]


class _ChunkedHead(torch.autograd.Function):
    """The LM head and log-softmax of `head_logprobs`, chunked in both passes.

    Outputs: log-probs [M] and entropies [M] (zeros, not differentiable, without `with_entropy`).
    Backward, per chunk: with z = logits / T, p = softmax(z), g the incoming gradient of each
    row's log-prob and e that of its entropy H = logsumexp(z) - sum(p z):
    d(logits) = (g (onehot(id) - p) - e p (z - sum(p z))) / T, so dh = d(logits) W,
    dW = d(logits)^T h, db = sum of d(logits); dW is accumulated in float32 (float64 for a float64
    model)."""

    @staticmethod
    def forward(ctx, h, ids, temperature, chunk, gathered, with_entropy, weight, bias):
        # An output the loss does not use gets None in backward, not a tensor of zeros: an entropy
        # that is only logged costs backward nothing.
        ctx.set_materialize_grads(False)
        out, ent = [], []
        for s in range(0, len(ids), chunk):
            logits = F.linear(h[s : s + chunk], weight, bias)  # [m, V]
            out.append(token_logprobs(logits.unsqueeze(0), ids[s : s + chunk].unsqueeze(0), temperature).squeeze(0))
            if with_entropy:
                ent.append(token_entropy(logits, temperature))  # [m]
        ctx.save_for_backward(h, ids)
        # The parameters themselves, not their values: under ZeRO-3 they are partitioned again by
        # the time backward runs, which gathers them anew.
        ctx.weight, ctx.bias, ctx.temperature, ctx.chunk, ctx.gathered = weight, bias, temperature, chunk, gathered
        ctx.with_entropy = with_entropy
        lp = torch.cat(out) if out else h.new_zeros(0, dtype=torch.promote_types(h.dtype, torch.float32))  # [M]
        if not with_entropy:
            ent = torch.zeros_like(lp)  # [M]
            ctx.mark_non_differentiable(ent)
            return lp, ent
        return lp, torch.cat(ent) if ent else torch.zeros_like(lp)

    @staticmethod
    def backward(ctx, grad_out, grad_ent):
        h, ids = ctx.saved_tensors
        weight, bias, tau, chunk = ctx.weight, ctx.bias, ctx.temperature, ctx.chunk
        want_h, want_w, want_b = ctx.needs_input_grad[0], ctx.needs_input_grad[6], ctx.needs_input_grad[7]
        acc = torch.promote_types(weight.dtype, torch.float32)
        with ctx.gathered([p for p in (weight, bias) if p is not None]):
            grad_h = torch.empty_like(h) if want_h else None  # [M, H]
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None  # [V, H]
            grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if want_b else None  # [V]
            for s in range(0, len(ids), chunk):
                hc = h[s : s + chunk]  # [m, H]
                logits = F.linear(hc, weight, bias).to(acc) / tau  # [m, V]
                p = torch.softmax(logits, dim=-1)  # [m, V]
                if ctx.with_entropy and grad_ent is not None:
                    # dH/dz = -p (z - E_p[z]), z = logits / T (already): in place, into the logits'
                    # buffer, so the chunk holds two [m, V] buffers as without entropy
                    mean_z = (p * logits).sum(dim=-1, keepdim=True)  # [m, 1]
                    e = logits.sub_(mean_z).mul_(p).mul_(grad_ent[s : s + chunk].to(acc).unsqueeze(1))  # [m, V]
                else:
                    e = None
                del logits
                d = p.neg_()  # [m, V]: -p, in p's buffer
                d[torch.arange(len(hc), device=d.device), ids[s : s + chunk]] += 1.0  # onehot - p
                d *= (grad_out[s : s + chunk].to(acc) if grad_out is not None else d.new_zeros(len(hc))).unsqueeze(1)
                if e is not None:
                    d -= e
                    del e
                d /= tau
                if want_h:
                    grad_h[s : s + chunk] = (d.to(weight.dtype) @ weight).to(h.dtype)
                if want_w:
                    grad_w += d.t() @ hc.to(acc)
                if want_b:
                    grad_b += d.sum(0)
        return (grad_h, None, None, None, None, None,
                grad_w.to(weight.dtype) if want_w else None, grad_b.to(bias.dtype) if want_b else None)


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


def _hidden_shared_prompts(model, prompt_ids, completion_ids, pad_id, device) -> torch.Tensor | None:
    """[B, T, H]: at column t, the hidden state that predicts completion token t; None when the
    model's cache is not one this can share (then the caller runs the full sequences).

    The unique prompts run once (use_cache) and their K/V are expanded to the B completions; the
    completions then run against `_ReadOnlyPrefix`, which reads that K/V and stores nothing. Under
    gradient checkpointing, transformers drops the cache of checkpointed layers because a layer's
    recomputation would extend it twice; with a cache that is never extended, the layers may keep
    it (their `_can_checkpoint_with_cache`, transformers >= 5.17, set for this one call). The
    prompt pass itself runs without checkpointing (the module in eval mode for it: dropout is off in
    minigrpo's policies, so only checkpointing changes), keeping its activations: U prompts, not B.
    """
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    checkpointing = model.training and any(m.gradient_checkpointing for m in layers)
    if checkpointing and not all(hasattr(m, "_can_checkpoint_with_cache") for m in layers):
        return None  # an older transformers would drop the cache inside checkpointed layers
    owner, unique = [], []  # owner[i]: index into `unique` of sequence i's prompt
    for p in prompt_ids:
        if not unique or unique[-1] != p:
            unique.append(p)
        owner.append(len(unique) - 1)
    owner_t = torch.tensor(owner, dtype=torch.long, device=device)  # [B]
    p_ids, p_mask = _right_padded(unique, pad_id)  # [U, Lp]; right padding: no fully masked query row
    p_ids, p_mask = p_ids.to(device), p_mask.to(device)
    was_training = model.training
    model.train(False)  # no checkpointing for the prompt pass: it must fill the cache
    try:
        out = model.base_model(input_ids=p_ids, attention_mask=p_mask, use_cache=True)
    finally:
        model.train(was_training)
    if not all(type(layer) is DynamicLayer for layer in out.past_key_values.layers):
        return None  # sliding-window or other caches store K/V differently
    p_len = p_mask.sum(dim=1)  # [U]
    first = out.last_hidden_state[torch.arange(len(unique), device=device), p_len - 1]  # [U, H] predicts token 0
    h_first = first.index_select(0, owner_t).unsqueeze(1)  # [B, 1, H]
    t = max((len(c) for c in completion_ids), default=0)
    # The completion pass runs even when no completion has a second token (then over one padding
    # column, sliced off below): under ZeRO-3 every forward gathers parameters collectively, so
    # the number of passes must not depend on this rank's data.
    cache = out.past_key_values
    cache.reorder_cache(owner_t)  # each layer's K/V: [U, h, Lp, d] -> [B, h, Lp, d], differentiable
    c_ids, c_mask = _right_padded([c[:-1] for c in completion_ids], pad_id)  # the last token predicts nothing
    width = max(t - 1, 1)
    c_ids, c_mask = c_ids[:, :width].to(device), c_mask[:, :width].to(device)  # [B, T-1] (at least one column)
    positions = p_len.index_select(0, owner_t).unsqueeze(1) + torch.arange(width, device=device)  # [B, T-1]
    saved = [m._can_checkpoint_with_cache for m in layers] if checkpointing else []
    for m in layers if checkpointing else []:
        m._can_checkpoint_with_cache = True  # read-only cache: recomputation sees the same prefix
    try:
        rest = model.base_model(
            input_ids=c_ids, attention_mask=torch.cat([p_mask.index_select(0, owner_t), c_mask], dim=1),
            position_ids=positions, past_key_values=_ReadOnlyPrefix(cache.layers), use_cache=True,
        ).last_hidden_state  # [B, T-1, H]
    finally:
        for m, flag in zip(layers, saved):
            m._can_checkpoint_with_cache = flag
    return torch.cat([h_first, rest], dim=1)[:, :t]  # [B, T, H]


class _ReadOnlyPrefix(DynamicCache):
    """A prompt prefix's K/V that a forward reads and never extends: `update` returns prefix + the
    new K/V and stores nothing, so running the same forward again gives the same result.
    transformers 5.19: a model's attention calls `cache.update(k, v, layer_idx)` for the keys and
    values to attend over, and reads `get_seq_length`/`get_mask_sizes` (from the layers, unchanged)."""

    def __init__(self, layers):
        Cache.__init__(self, layers=layers)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)
