"""The rollout interface: what the trainer asks of a generation engine, and what it gets back.

Legend: P prompts, G generations per prompt, N = P*G completions, T padded completion length.

Every engine (in-process vLLM, plain transformers, a vLLM server in another process) implements
`RolloutEngine`, and the trainer uses nothing else, so switching layouts is configuration only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Sampling:
    """Sampling settings for one `generate` call; `n` completions per prompt."""

    n: int
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"Sampling.n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"Sampling.max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"Sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"Sampling.top_k must be >= 0 (0 disables it), got {self.top_k}")


@dataclass
class RolloutBatch:
    """N = P*G completions, prompt-major: completions i*G .. i*G+G-1 belong to prompt i.

    `logprobs[i][t]` is the log-probability of `completion_ids[i][t]` under the distribution the
    engine actually sampled from (logits divided by the temperature), so that it equals
    `token_logprobs(policy_logits, ids, temperature)` of the same weights. That holds without
    top-p/top-k (top_p=1, top_k=0); with them, TorchEngine reports the value before filtering and
    VLLMEngine (vLLM's processed logprobs) the one after filtering and renormalizing.
    """

    prompt_ids: list[list[int]]  # [N] ragged: the prompt of each completion (repeated per group)
    completion_ids: list[list[int]]  # [N] ragged
    texts: list[str]  # [N] decoded completions (special tokens skipped)
    logprobs: list[list[float]]  # [N] ragged, len == len(completion_ids[i])
    finish_reasons: list[str]  # [N] "stop" (EOS or a stop string/token) or "length"
    group_size: int  # G

    def __post_init__(self):
        n = len(self.completion_ids)
        for name in ("prompt_ids", "texts", "logprobs", "finish_reasons"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"RolloutBatch.{name} has {len(getattr(self, name))} entries, expected {n}")
        if self.group_size < 1 or n % self.group_size:
            raise ValueError(f"RolloutBatch of {n} completions is not whole groups of {self.group_size}")
        for i, (ids, lps) in enumerate(zip(self.completion_ids, self.logprobs)):
            if len(ids) != len(lps):
                raise ValueError(f"completion {i}: {len(ids)} tokens but {len(lps)} logprobs")
        bad = set(self.finish_reasons) - {"stop", "length"}
        if bad:
            raise ValueError(f"unknown finish reasons {sorted(bad)}; expected 'stop' or 'length'")

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def num_prompts(self) -> int:
        return len(self) // self.group_size

    @property
    def truncated(self) -> list[bool]:
        return [r == "length" for r in self.finish_reasons]

    def slice(self, s: slice) -> RolloutBatch:
        """A micro-batch view (lists are copied, not tokens); `s` must cover whole sequences."""
        return RolloutBatch(
            self.prompt_ids[s], self.completion_ids[s], self.texts[s], self.logprobs[s],
            self.finish_reasons[s], group_size=1,
        )

    def groups(self, keep: list[int]) -> RolloutBatch:
        """The completions of the groups (prompt indices) `keep`, in that order."""
        idx = [g * self.group_size + j for g in keep for j in range(self.group_size)]
        return RolloutBatch([self.prompt_ids[i] for i in idx], [self.completion_ids[i] for i in idx],
                            [self.texts[i] for i in idx], [self.logprobs[i] for i in idx],
                            [self.finish_reasons[i] for i in idx], group_size=self.group_size)

    @staticmethod
    def concat(batches: list[RolloutBatch]) -> RolloutBatch:
        """One batch of the groups of `batches` (all of the same group size), in order."""
        return RolloutBatch(*([x for b in batches for x in getattr(b, name)]
                              for name in ("prompt_ids", "completion_ids", "texts", "logprobs", "finish_reasons")),
                            group_size=batches[0].group_size)

    def padded(self, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded completion tensors: ids [N, T] long, mask [N, T] bool, logprobs [N, T] float32."""
        n, t = len(self), max((len(c) for c in self.completion_ids), default=0)
        ids = torch.full((n, t), pad_id, dtype=torch.long)  # [N, T]
        mask = torch.zeros((n, t), dtype=torch.bool)  # [N, T]
        lps = torch.zeros((n, t), dtype=torch.float32)  # [N, T]
        for i, (c, lp) in enumerate(zip(self.completion_ids, self.logprobs)):
            ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[i, : len(c)] = True
            lps[i, : len(c)] = torch.tensor(lp, dtype=torch.float32)
        return ids, mask, lps


def vllm_requests(prompt_ids: list[list[int]], sampling: Sampling) -> list[tuple[list[int], int, int | None]]:
    """How both vLLM engines (colocated and server) ask for `sampling.n` completions of each prompt:
    (prompt, n, seed) per request, in prompt-major order. One request of n = G per prompt; greedy,
    G requests of n = 1 (vLLM 0.32 refuses n > 1 with greedy sampling). vLLM gives child j of a
    request the seed `seed + j`; offsetting prompt i by i*G gives all N completions distinct seeds
    while a fixed seed still reproduces the batch, in either engine."""
    check_token_lists(prompt_ids, "prompt_ids")
    g = sampling.n
    per_request = 1 if sampling.temperature == 0 else g
    return [(list(p), per_request, None if sampling.seed is None else sampling.seed + i * g)
            for i, p in enumerate(prompt_ids) for _ in range(g // per_request)]


def check_token_lists(seqs: list[list[int]], what: str) -> None:
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError(f"{what} must be a non-empty list of non-empty token id lists")


class WeightSyncError(RuntimeError):
    """The engine does not compute with the weights it was sent: never train on stale weights."""


@dataclass(frozen=True)
class Probe:
    """A fixed token sequence and the policy's log-probabilities of its tokens 1..L-1.

    After a weight push the engine scores the same tokens; if any differs from `expected` by more
    than `atol`, the push did not take and `push_weights` raises `WeightSyncError`.
    """

    token_ids: tuple[int, ...]  # [L]
    expected: tuple[float, ...]  # [L-1]: logprob of token_ids[t] given token_ids[:t], t = 1..L-1
    atol: float


class RolloutEngine(Protocol):
    """What the trainer needs from a generation engine."""

    # True when the engine generates with the policy module itself (nothing to push).
    shares_policy_weights: bool

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> RolloutBatch:
        """`sampling.n` completions for each of the P prompts (token ids), prompt-major."""
        ...

    def score(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Log-probability of tokens 1..L-1 of each sequence given the ones before (temperature 1)."""
        ...

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], probe: Probe | None,
                     version: int | None = None) -> object:
        """Load these weights (Hugging Face names) in place and verify them: exactly, every engine
        weight against the bits of the tensors given (engines with a copy of the weights), and
        with `probe`. A mismatch is a `WeightSyncError`. `version`: the optimizer step the weights
        are from (the server layout sets it as vLLM's weight version)."""
        ...
