"""Rollouts with plain transformers on the policy module itself (no second copy of the weights).

Legend: P prompts, G = sampling.n generations per prompt, N = P*G completions, A sequences still
running, L padded prompt length, V vocabulary.

Our own sampling loop rather than `model.generate`: it reports log_softmax(logits / temperature)
of each sampled token as it goes (generate's `output_logits` would keep [N, V] per step, 3 GB for
64 x 256 tokens of a 49k vocabulary), prefills each prompt once and copies its KV cache G times,
and drops finished sequences from the batch.

Log-probabilities are those of the temperature-scaled distribution BEFORE top-k/top-p filtering,
computed exactly as the trainer does (`log_softmax(logits.float() / temperature)`), so they match
`token_logprobs` of the same weights. At temperature 0 (greedy) they are log_softmax(logits).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from minigrpo import collectives
from minigrpo.rollout.base import Probe, RolloutBatch, Sampling, WeightSyncError


class TorchEngine:
    """Batched, left-padded, KV-cached sampling with `model` (a transformers causal LM).

    `push_weights` loads nothing: the engine computes with the policy's own parameters. Given a
    probe it still scores it and raises `WeightSyncError` on a mismatch, which checks that the
    trainer built the probe from the weights it is training (cheap: one forward of L tokens).

    Under DeepSpeed ZeRO-3 the module's forward gathers its partitioned parameters itself, and keeps
    the small ones (below `stage3_param_persistence_threshold`: norms, biases) gathered for good after
    the first forward. So generation runs under `no_grad`, never `inference_mode`: a parameter
    gathered in inference mode is an inference tensor, and the first training forward then fails
    ("Inference tensors cannot be saved for backward"; 2 ranks, ZeRO-3, DeepSpeed 0.19.8).
    """

    shares_policy_weights = True

    def __init__(self, model: torch.nn.Module, tokenizer, lockstep: bool = False):
        """lockstep: every rank runs the same number of forward passes per `generate` call (a rank
        whose completions have all ended keeps decoding one ghost row until every rank's have).
        Needed under DeepSpeed ZeRO-3, where each forward gathers the parameters collectively."""
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; load it with minigrpo.models.load_tokenizer")
        self.model = model
        self.tokenizer = tokenizer
        self.lockstep = lockstep
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        if not eos:
            raise ValueError("neither the model's generation_config nor the tokenizer names an EOS token")
        self.eos_token_ids = tuple(sorted(set(eos)))

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> RolloutBatch:
        """`sampling.n` completions for each of the P prompts, prompt-major (N = P*G)."""
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("prompt_ids must be a non-empty list of non-empty token id lists")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():  # not inference_mode: see the class docstring
                ids, lps, reasons = self._sample(prompt_ids, sampling)
        finally:
            self.model.train(was_training)
        texts = [self._text(c, r, sampling.stop) for c, r in zip(ids, reasons)]
        prompts = [list(p) for p in prompt_ids for _ in range(sampling.n)]
        return RolloutBatch(prompts, ids, texts, lps, reasons, group_size=sampling.n)

    def _sample(self, prompt_ids, sampling: Sampling):
        g, device = sampling.n, next(self.model.parameters()).device
        n = len(prompt_ids) * g
        gen = torch.Generator(device=device)
        if sampling.seed is None:
            gen.seed()
        else:
            gen.manual_seed(sampling.seed)
        temperature = sampling.temperature if sampling.temperature > 0 else 1.0
        stop_ids = torch.tensor(sorted(set(self.eos_token_ids) | set(sampling.stop_token_ids)), device=device)
        window = max((len(s) for s in sampling.stop), default=0) + 8  # tokens: each decodes to >= 1 char

        # Prefill each prompt once, left-padded, then copy its cache and last logits G times.
        width = max(len(p) for p in prompt_ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompt_ids], device=device)  # [P, L]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)  # [P, L]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [P, L]
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        # transformers 5.19: Cache.batch_repeat_interleave / batch_select_indices reshape the
        # KV cache along the batch (the contrastive-search helpers).
        cache = out.past_key_values
        cache.batch_repeat_interleave(g)
        logits = out.logits[:, -1].repeat_interleave(g, 0)  # [N, V]
        mask = mask.repeat_interleave(g, 0)  # [N, L]
        next_pos = positions[:, -1].repeat_interleave(g, 0) + 1  # [N]

        ids: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[float]] = [[] for _ in range(n)]
        reasons = ["length"] * n
        ended = [False] * n  # a row that ended may still run as a ghost (lockstep), unrecorded
        active = torch.arange(n, device=device)  # [A] rows of the batch still running
        for step in range(sampling.max_tokens):
            # Noise for all N rows every step, then the running ones: a completion depends on its
            # seed and row only, not on when the other rows finished.
            noise = torch.empty(n, logits.shape[-1], device=device).exponential_(generator=gen)[active]  # [A, V]
            token, logprob = _sample_step(logits, temperature, sampling, noise)  # [A], [A]
            stopped = torch.isin(token, stop_ids)  # [A]
            for row, (i, t, lp) in enumerate(zip(active.tolist(), token.tolist(), logprob.tolist())):
                if ended[i]:
                    stopped[row] = True
                    continue
                ids[i].append(t)
                lps[i].append(lp)
                if sampling.stop and not stopped[row]:
                    tail = self.tokenizer.decode(ids[i][-window:], skip_special_tokens=True)
                    stopped[row] = any(s in tail for s in sampling.stop)
            for i in active[stopped].tolist():
                reasons[i] = "stop" if not ended[i] else reasons[i]
                ended[i] = True
            keep = ~stopped  # [A]
            running = keep.any().item()
            if self.lockstep:
                elsewhere = collectives.all_reduce_scalars([float(running)], "max")[0] > 0
                if elsewhere and not running:
                    keep[0] = True  # a ghost row: this rank's forward passes stay in step with the others'
                running = elsewhere
            if not running or step == sampling.max_tokens - 1:
                break
            if not keep.all():
                cache.batch_select_indices(keep.nonzero().squeeze(1))
                active, token, mask, next_pos = active[keep], token[keep], mask[keep], next_pos[keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)  # [A, L + step + 1]
            out = self.model(
                input_ids=token[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                past_key_values=cache, use_cache=True,
            )
            logits = out.logits[:, -1]  # [A, V]
            next_pos = next_pos + 1
        return ids, lps, reasons

    def _text(self, ids: list[int], reason: str, stops: tuple[str, ...]) -> str:
        """Decoded completion; after a stop string, cut right after its first occurrence (as vLLM)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        ends = [text.find(s) + len(s) for s in stops if s in text]
        return text[: min(ends)] if reason == "stop" and ends else text

    # ------------------------------------------------------------------ weights

    def score(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Log-probability of tokens 1..L-1 of each sequence given the ones before (temperature 1)."""
        was_training = self.model.training
        self.model.eval()
        try:
            scores = []
            with torch.no_grad():  # not inference_mode: see the class docstring
                device = next(self.model.parameters()).device
                for seq in token_ids:
                    if len(seq) < 2:
                        raise ValueError("score needs sequences of at least 2 tokens")
                    ids = torch.tensor([seq], device=device)  # [1, L]
                    logits = self.model(input_ids=ids).logits[0, :-1]  # [L-1, V]
                    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
                    lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]  # [L-1]
                    scores.append(lp.tolist())
            return scores
        finally:
            self.model.train(was_training)

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], probe: Probe | None,
                     version: int | None = None) -> None:
        """Nothing to load (the tensors are not even read); verify `probe` if given."""
        if probe is None:
            return
        got = torch.tensor(self.score([list(probe.token_ids)])[0], dtype=torch.float64)  # [L-1]
        diff = (got - torch.tensor(probe.expected, dtype=torch.float64)).abs().max().item()
        if not diff <= probe.atol:
            raise WeightSyncError(f"policy's probe logprobs differ from the probe's expected by {diff:.3g} > atol {probe.atol}")


def _sample_step(logits: torch.Tensor, temperature: float, sampling: Sampling, noise: torch.Tensor):
    """Sample one token per row of logits [A, V] using Exp(1) noise [A, V]; return tokens [A] and
    their logprobs [A] under log_softmax(logits / temperature), before top-k/top-p filtering."""
    scaled = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # [A, V], as token_logprobs
    logprobs = torch.log_softmax(scaled, dim=-1)  # [A, V]
    if sampling.temperature == 0:
        token = scaled.argmax(dim=-1)  # [A]
    else:
        filtered = scaled
        if sampling.top_k > 0 and sampling.top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, sampling.top_k, dim=-1).values[:, -1:]  # [A, 1]
            filtered = filtered.masked_fill(filtered < kth, float("-inf"))
        if sampling.top_p < 1.0:
            sorted_logits, order = torch.sort(filtered, dim=-1, descending=True)  # [A, V]
            probs = torch.softmax(sorted_logits, dim=-1)
            # drop a token when the tokens before it already reach top_p; the first always stays
            drop_sorted = (probs.cumsum(-1) - probs) >= sampling.top_p  # [A, V]
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            filtered = filtered.masked_fill(drop, float("-inf"))
        # argmax(p / E) with E ~ Exp(1) is a sample from p (the exponential race)
        token = (torch.softmax(filtered, dim=-1) / noise).argmax(dim=-1)  # [A]
    return token, logprobs.gather(-1, token[:, None]).squeeze(1)
