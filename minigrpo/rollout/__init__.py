"""Rollout engines: every one implements `RolloutEngine` (base.py), so the trainer never asks which.

    engine = make_engine("vllm", path, seed=0)                  # vLLM in this process
    engine = make_engine("torch", policy=model, tokenizer=tok)  # transformers, on the policy itself

`VLLMEngine` is imported only when asked for, so `import minigrpo.rollout` works without vLLM.
"""

from __future__ import annotations

import os

from minigrpo.rollout.base import Probe, RolloutBatch, RolloutEngine, Sampling, WeightSyncError
from minigrpo.rollout.torch_engine import TorchEngine

__all__ = [
    "Probe", "RolloutBatch", "RolloutEngine", "Sampling", "WeightSyncError",
    "TorchEngine", "VLLMEngine", "VLLM_OPTIONS", "make_engine",
]


# Keyword options of VLLMEngine. The trainer passes them whatever the kind; "torch" ignores them
# (it runs the policy module as it is) but still refuses names that are not options at all.
VLLM_OPTIONS = (
    "dtype", "seed", "max_model_len", "kv_cache_gib", "gpu_memory_utilization",
    "enable_prefix_caching", "enforce_eager", "push_chunk_bytes", "trust_remote_code",
)


def make_engine(
    kind: str,
    model_path: str | os.PathLike | None = None,
    *,
    policy=None,
    tokenizer=None,
    **options,
) -> RolloutEngine:
    """kind "vllm": `VLLMEngine(model_path, **options)`, a separate copy of the weights kept in sync
    by `push_weights`; kind "torch": `TorchEngine(policy, tokenizer)`, generating with the policy
    module itself. Without vLLM installed, "vllm" raises a one-line ImportError saying what to do."""
    unknown = sorted(set(options) - set(VLLM_OPTIONS))
    if unknown:
        raise TypeError(f"unknown rollout engine options {unknown}; known: {', '.join(VLLM_OPTIONS)}")
    if kind == "vllm":
        if model_path is None:
            raise ValueError("make_engine('vllm') needs model_path (a local Hugging Face folder)")
        from minigrpo.rollout.vllm_engine import VLLMEngine  # one-line ImportError without vLLM

        return VLLMEngine(model_path, **options)
    if kind == "torch":
        if policy is None or tokenizer is None:
            raise ValueError("make_engine('torch') needs policy= (the model being trained) and tokenizer=")
        return TorchEngine(policy, tokenizer)
    raise ValueError(f"unknown rollout engine {kind!r}; expected 'vllm' or 'torch'")


def __getattr__(name: str):
    if name == "VLLMEngine":  # lazy: importing vLLM takes seconds and it may not be installed
        from minigrpo.rollout.vllm_engine import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
