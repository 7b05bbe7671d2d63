"""Rollout engines: every one implements `RolloutEngine` (base.py), so the trainer never asks which.

    engine = make_engine("vllm", path, seed=0)                  # vLLM in this process
    engine = make_engine("vllm_server", path, server_port=0)    # vLLM in a server process (started here)
    engine = make_engine("torch", policy=model, tokenizer=tok)  # transformers, on the policy itself

`VLLMEngine` is imported only when asked for, so `import minigrpo.rollout` works without vLLM.
"""

from __future__ import annotations

import logging
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
    "enable_prefix_caching", "enforce_eager", "push_chunk_bytes", "trust_remote_code", "log_level", "sleep_mode",
)
# Options of the "vllm_server" kind only (the others ignore them): where the server is, how long
# any wait on it may take, and its tensor parallel size when the trainer starts it.
SERVER_OPTIONS = ("server_host", "server_port", "server_timeout", "server_devices", "server_allow_remote",
                  "server_log", "tensor_parallel_size")


def make_engine(
    kind: str,
    model_path: str | os.PathLike | None = None,
    *,
    policy=None,
    tokenizer=None,
    lockstep: bool = False,
    **options,
) -> RolloutEngine:
    """kind "vllm": `VLLMEngine(model_path, **options)`, a separate copy of the weights kept in sync
    by `push_weights`; kind "torch": `TorchEngine(policy, tokenizer)`, generating with the policy
    module itself; kind "vllm_server": `VLLMServerEngine`, a client of vLLM's OpenAI-compatible
    server in another process (the `server_*` options; server_port 0/None starts one). `lockstep` (kind "torch"): every rank runs
    as many forward passes (see TorchEngine). Without vLLM installed, "vllm" raises a one-line
    ImportError saying what to do."""
    unknown = sorted(set(options) - set(VLLM_OPTIONS) - set(SERVER_OPTIONS))
    if unknown:
        raise TypeError(f"unknown rollout engine options {unknown}; known: {', '.join(VLLM_OPTIONS + SERVER_OPTIONS)}")
    server = {k: options.pop(k) for k in SERVER_OPTIONS if k in options}
    if kind == "vllm_server":
        if model_path is None:
            raise ValueError("make_engine('vllm_server') needs model_path (a local Hugging Face folder)")
        from minigrpo.rollout.server_engine import VLLMServerEngine  # no vLLM in this process

        named = {"server_host": "host", "server_port": "port", "server_timeout": "timeout", "server_devices": "devices",
                 "server_allow_remote": "allow_remote", "server_log": "log_path"}
        return VLLMServerEngine(model_path, **{named.get(k, k): v for k, v in server.items()}, **options)
    if kind == "vllm":
        if model_path is None:
            raise ValueError("make_engine('vllm') needs model_path (a local Hugging Face folder)")
        # vLLM 0.32 configures its logging only when an engine is built (from VLLM_LOGGING_LEVEL),
        # but logs while it is imported (e.g. "Triton is installed, but ..."), through Python's
        # last-resort handler: so the "vllm" logger's level is set before the import below.
        # VLLMEngine sets the variable for the engine and its processes.
        logging.getLogger("vllm").setLevel(options.get("log_level", "warning").upper())
        from minigrpo.rollout.vllm_engine import VLLMEngine  # one-line ImportError without vLLM

        return VLLMEngine(model_path, **options)
    if kind == "torch":
        if policy is None or tokenizer is None:
            raise ValueError("make_engine('torch') needs policy= (the model being trained) and tokenizer=")
        return TorchEngine(policy, tokenizer, lockstep=lockstep)
    raise ValueError(f"unknown rollout engine {kind!r}; expected 'vllm' or 'torch' (in this process) or 'vllm_server'")


def __getattr__(name: str):
    if name == "VLLMEngine":  # lazy: importing vLLM takes seconds and it may not be installed
        from minigrpo.rollout.vllm_engine import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
