"""What `trainer.train` does before step 1: check the inputs (loading nothing, so a mistake fails in
seconds), load the policy, the reference and the rollout engine, and resume from a checkpoint.

`Run` holds what every phase of a step reads and no step changes; `LoopState` what a checkpoint
records of the loop's progress. The settings that make a run what it is (its data order, learning
rate schedule and LoRA shape) are written into every checkpoint and compared on resume.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from minigrpo import checkpoint as ckpt
from minigrpo import collectives, lora
from minigrpo.ahead import Ahead
from minigrpo.batching import PromptSet, prepare_prompts, required_columns, reward_columns
from minigrpo.config import Config, ConfigError, Layout
from minigrpo.console import launched_as_rank0, stage
from minigrpo.engine import DistInfo, PolicyEngine, init_distributed, warmup_steps
from minigrpo.evaluation import check_reward_names
from minigrpo.models import load_causal_lm, load_tokenizer, resolve_model, set_transformers_log_level
from minigrpo.plan import GiB, check_plan, gpu_bytes, model_config, plan_memory
from minigrpo.rewards import REWARD_ARGUMENTS, Reward
from minigrpo.rewards.isolation import accepted_keywords
from minigrpo.rollout import Sampling, make_engine
from minigrpo.runtime import seed_everything
from minigrpo.sync import PROBE_TEXT, probe_tolerance, sync_weights


@dataclasses.dataclass(frozen=True)
class TrainerState:
    """What rewards receive as `trainer_state=` (TRL's name and fields): `global_step` optimizer
    updates are done, of `max_steps` in the run. As in TRL these count updates: a minigrpo step makes
    num_iterations of them, so while step k's completions are scored global_step = (k - 1) * num_iterations."""

    global_step: int
    max_steps: int


def trainer_state(cfg: Config, steps_done: int) -> TrainerState:
    return TrainerState(steps_done * cfg.num_iterations, cfg.max_steps * cfg.num_iterations)


@dataclasses.dataclass(frozen=True)
class Run:
    """The run's fixed parts, read by every phase of a step."""

    cfg: Config
    info: DistInfo
    layout: Layout
    out: Path
    model_path: Path  # the model's local folder (config.json, weights, tokenizer)
    rewards: list[Reward]
    tokenizer: object
    train_set: PromptSet
    eval_set: PromptSet | None
    policy: PolicyEngine
    reference: torch.nn.Module | PolicyEngine | None  # None when beta == 0; LoRA: the policy, adapters off
    adapter: dict | None  # LoRA: what a checkpoint's adapter/ folder records
    rollout: object  # a RolloutEngine (minigrpo.rollout)
    sampling: Sampling  # the training sampling; each round gets its own seed
    probe_ids: list[int]
    probe_atol: float | None  # the push probe's tolerance (None: the engine shares the policy's weights)
    ahead: Ahead | None = None  # async_generation: the batches generated ahead of training

    @property
    def main(self) -> bool:
        return self.info.rank == 0


@dataclasses.dataclass
class LoopState:
    """The loop's progress, as a checkpoint records it."""

    step: int = 0  # steps done
    data_position: int = 0  # the next prompt of the data order (batching.py)
    nonfinite_in_a_row: int = 0


def check_inputs(cfg: Config, rewards: list, train_dataset, eval_dataset, template, resume: bool) -> list[Reward]:
    """Validate everything that needs no model; returns the rewards as `Reward`s, weighted."""
    cfg.validate()
    weights = cfg.reward_weights or [1.0] * len(rewards)
    if len(weights) != len(rewards):
        raise ValueError(f"reward_weights has {len(weights)} entries for {len(rewards)} reward functions")
    rewards = [r if isinstance(r, Reward) else Reward(r, w) for r, w in zip(rewards, weights)]
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"reward names must be unique (they key the metrics), got {names}; pass Reward(fn, name=...)")
    out = Path(cfg.output_dir)
    if not resume and ckpt.latest_checkpoint(out) is not None:
        raise FileExistsError(
            f"{out} already holds checkpoints of another run ({ckpt.latest_checkpoint(out).name}); "
            "continue it with --resume (train(..., resume=True)) or choose another output_dir"
        )
    for ds, name in ((train_dataset, "train"), (eval_dataset, "eval")):
        if ds is None:
            continue
        if len(ds) == 0:
            raise ValueError(f"the {name} dataset is empty")
        offered = [*REWARD_ARGUMENTS, *reward_columns(ds.column_names, template)]
        for r in rewards:
            missing = [c for c in required_columns(r.fn) if c not in ds.column_names]
            if missing:
                raise ValueError(f"reward {r.name!r} needs column(s) {missing}; the {name} dataset has {ds.column_names}")
            try:  # what else a call by keyword cannot fill (a positional-only parameter, `prompt`)
                accepted_keywords(r.fn, offered)
            except TypeError as e:
                raise ValueError(f"reward {r.name!r} {e}") from None
    if eval_dataset is not None:
        check_reward_names(rewards)  # now, not at the first evaluation (maybe the last step)
    return rewards


def start_run(cfg: Config, rewards: list[Reward], train_dataset, eval_dataset, template,
              resume: bool) -> tuple[Run, LoopState]:
    """Tokenize the prompts, start the processes, load the models and engines, resume, calibrate the push probe."""
    set_transformers_log_level(cfg.log_level)
    model_path = resolve_model(cfg.model, cfg.model_cache_dir)  # a bad path fails here, in one line
    n = len(train_dataset) + (len(eval_dataset) if eval_dataset else 0)
    # the process group (info.rank) is joined inside this stage
    with stage(f"tokenizing {n} prompts, starting DeepSpeed's process group", launched_as_rank0()):
        tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
        train_set = prepare_prompts(train_dataset, tokenizer, template, cfg.max_prompt_length)  # too long: error
        eval_set = prepare_prompts(eval_dataset, tokenizer, template, cfg.max_prompt_length) if eval_dataset else None
        info = init_distributed(cfg.log_level, cfg.dist_timeout_minutes)
    _check_plan(cfg, model_path, info)  # memory (on a GPU) and disk, before any model loads
    layout = cfg.layout(info.world_size)
    seed_everything(cfg.seed + info.rank)
    main = info.rank == 0
    with stage(f"loading {model_path.name} and its DeepSpeed engine", main):
        policy, reference, adapter = _load_models(cfg, model_path, info, layout)
    with stage(_engine_stage(cfg), main):
        rollout = _make_rollout(cfg, model_path, policy, tokenizer, info)
    probe_ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]

    out = Path(cfg.output_dir)
    state = _resume(cfg, out, policy, info) if resume else LoopState()
    if state.step > 0 or cfg.lora_quantize or cfg.rollout == "vllm_server":
        # The engine loaded the model's own weights; the policy is a checkpoint's, or (Q-LoRA) the
        # dequantized 4-bit base; or the engine is a server that outlives runs, and a joined one may
        # hold what an earlier run pushed (the probe's calibration below would take any difference
        # for noise). Pushed with the exact check only: the probe is calibrated next.
        sync_weights(rollout, policy, probe_ids, None, version=state.step)
    probe_atol = probe_tolerance(rollout, policy, probe_ids, cfg.sync_check_atol, info.rank == 0)  # same weights now
    sampling = Sampling(n=cfg.num_generations, max_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                        top_p=cfg.top_p, top_k=cfg.top_k, stop=tuple(cfg.stop))
    run = Run(cfg, info, layout, out, model_path, rewards, tokenizer, train_set, eval_set, policy, reference, adapter, rollout,
              sampling, probe_ids, probe_atol)
    if cfg.async_generation:
        run = dataclasses.replace(run, ahead=Ahead(cfg.max_staleness, cfg.max_steps))
        if state.step > 0:  # what was generated ahead of the checkpoint, with weights that are gone now
            run.ahead.from_json(ckpt.read_ahead(ckpt.latest_checkpoint(out), info.rank), state.step)
    return run, state


def _engine_stage(cfg: Config) -> str:
    """What the console says while the rollout engine starts (the longest silent stretch before)."""
    if cfg.rollout == "torch":
        return "starting the torch rollout engine"
    if cfg.rollout == "vllm_server":
        return "joining or starting the vLLM server (its log: output_dir/vllm_server.log)"
    compiles = "" if cfg.vllm_enforce_eager else ": its torch.compile takes a minute or two the first time, then is cached"
    return f"starting the vLLM engine{compiles}"


def _check_plan(cfg: Config, model_path: Path, info: DistInfo) -> None:
    """The memory and disk plan (minigrpo/plan.py) judged before any model loads, every rank agreeing.
    A model the plan cannot describe (an architecture transformers builds only with its own code, say)
    is planned for nothing: a warning on CPU, an error on a GPU unless memory_check is off."""
    gpu = gpu_bytes(info.local_rank)
    on_gpu = gpu is not None
    error, plan = None, None
    try:
        plan = plan_memory(cfg, info.world_size, gpu or 80 * GiB, model_config(cfg, model_path))
    except (ValueError, KeyError, AttributeError, TypeError, OSError, ImportError) as e:
        reason = f"no memory and disk plan for {model_path} ({type(e).__name__}: {e})"
        if on_gpu and cfg.memory_check:
            error = RuntimeError(f"{reason}; memory_check=false (--force) runs without it")
        elif info.rank == 0:
            print(f"[minigrpo] warning: {reason}", file=sys.stderr, flush=True)
    if plan is not None:
        try:
            check_plan(cfg, plan, info.world_size, gpu)
        except (MemoryError, RuntimeError) as e:
            error = e
    collectives.raise_if_any(error, RuntimeError, "the memory and disk plan")


def _load_models(cfg: Config, model_path: Path, info: DistInfo, layout: Layout) -> tuple[PolicyEngine, object, dict | None]:
    """The policy in its DeepSpeed engine, the frozen reference (beta > 0 only) and, with LoRA, the adapter record."""
    device = torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, cfg.dtype)
    if cfg.lora_quantize:  # Q-LoRA: quantized while loading onto the device (a 4-bit model does not move)
        model = load_causal_lm(model_path, dtype, cfg.trust_remote_code, quantize=cfg.lora_quantize, device=device)
    else:
        model = load_causal_lm(model_path, dtype, cfg.trust_remote_code).to(device)
    adapter = None
    if cfg.lora_rank > 0:
        targets = lora.add_adapters(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
        adapter = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "base_model": str(model_path),
                   "targets": sorted({t.rpartition(".")[2] for t in targets}), "quantize": cfg.lora_quantize,
                   "dtype": cfg.dtype}
    policy = PolicyEngine(model, cfg, layout)
    reference = None  # never loaded when beta == 0; with LoRA the policy with its adapters off
    if cfg.beta > 0:
        reference = policy if adapter else (
            load_causal_lm(model_path, dtype, cfg.trust_remote_code).to(device).eval().requires_grad_(False))
    return policy, reference, adapter


def engine_memory(cfg: Config, on_gpu: bool) -> dict:
    """The rollout engine's KV-cache setting: colocated, the configured share of the GPU it shares
    with training (or the engine's default); the server, its own GPU's share (issue 24: the 3B
    recipe's colocated 0.3 had been passed to the server's dedicated GPU). None: the engine decides."""
    if cfg.vllm_kv_cache_gib is not None:
        return {"kv_cache_gib": cfg.vllm_kv_cache_gib}
    if cfg.rollout == "vllm_server":
        return {"gpu_memory_utilization": cfg.vllm_server_gpu_memory_utilization} if on_gpu else {}
    return {"gpu_memory_utilization": cfg.vllm_gpu_memory_utilization} if cfg.vllm_gpu_memory_utilization else {}


def _make_rollout(cfg: Config, model_path: Path, policy: PolicyEngine, tokenizer, info: DistInfo):
    return make_engine(
        cfg.rollout, model_path, policy=policy.module, tokenizer=tokenizer, dtype=cfg.dtype,
        lockstep=policy.zero_stage == 3 and info.world_size > 1,  # rollout=torch: ZeRO-3 forwards are collective
        seed=cfg.seed + info.rank, max_model_len=cfg.max_prompt_length + cfg.max_completion_length,
        trust_remote_code=cfg.trust_remote_code, enforce_eager=cfg.vllm_enforce_eager,
        server_host=cfg.vllm_server_host, server_port=cfg.vllm_server_port, server_timeout=cfg.vllm_server_timeout,
        server_devices=cfg.vllm_server_devices, server_allow_remote=cfg.vllm_server_allow_remote,  # vllm_server only
        server_log=Path(cfg.output_dir) / "vllm_server.log",  # a server rank 0 starts writes its log here
        tensor_parallel_size=cfg.vllm_server_tensor_parallel_size, log_level=cfg.log_level,
        **({"sleep_mode": True} if cfg.vllm_sleep else {}),  # colocated vLLM only (config-checked)
        **engine_memory(cfg, torch.cuda.is_available()),
    )


def _resume(cfg: Config, out: Path, policy: PolicyEngine, info: DistInfo) -> LoopState:
    """The latest complete checkpoint's weights, optimizer, RNG and loop state; step 0 if there is none."""
    last = ckpt.latest_checkpoint(out)
    if last is None:
        if info.rank == 0:
            print(f"[minigrpo] --resume: no complete checkpoint in {out / 'checkpoints'}; starting from step 0")
        return LoopState()
    check_same_run(ckpt.read_state(last), cfg, last)  # before loading: a LoRA shape change would fail inside
    saved = ckpt.restore(last, policy, info.rank)
    policy.optimizer.skipped = saved["nonfinite_skipped_steps"]
    if info.rank == 0:
        print(f"[minigrpo] resumed from {last} (step {saved['step']})")
    return LoopState(saved["step"], saved["data_position"], saved["nonfinite_in_a_row"])


# ------------------------------------------------------------------ what makes a run this run (checked on resume)
def run_identity(cfg: Config) -> dict:
    """The settings a checkpoint records so a resume cannot silently become another run."""
    return {"data_order": _data_order(cfg), "schedule": _schedule(cfg), "lora": _lora(cfg)}


def _data_order(cfg: Config) -> dict:
    """The settings that decide which prompts step k trains on (see batching.prompt_indices), the
    generator's difficulty included (checkpoints from before it was recorded: the defaults)."""
    keys = ("seed", "prompts_per_step", "num_generations", "dataset", "dataset_size", "test_size", "heldout",
            *(f"generator_{k}" for k in cfg.generator_difficulty()))
    return {k: getattr(cfg, k) for k in keys}


def _schedule(cfg: Config) -> dict:
    """What decides the learning rate and the number of updates at every step: a resumed run with
    other values would silently continue another schedule. max_steps is part of it only where it
    moves the learning rate (cosine decay, warmup), so a constant schedule without warmup can be
    extended by resuming with a larger max_steps."""
    total = cfg.max_steps * cfg.num_iterations
    out = {"learning_rate": cfg.learning_rate, "lr_scheduler_type": cfg.lr_scheduler_type,
           "num_iterations": cfg.num_iterations, "warmup_steps": warmup_steps(total, cfg.warmup_ratio)}
    if cfg.lr_scheduler_type != "constant" or out["warmup_steps"] > 0:
        out["max_steps"] = cfg.max_steps
    return out


def _lora(cfg: Config) -> dict:
    """What a checkpoint's trained weights are: the full model, or adapters of this shape on this
    base model (the checkpoint holds only the adapters, so another base would load silently)."""
    keys = ("lora_rank", "lora_alpha", "lora_target_modules", "lora_quantize", "model")
    return {k: getattr(cfg, k) for k in keys} if cfg.lora_rank else {"lora_rank": 0}


def check_same_run(state: dict, cfg: Config, folder: Path) -> None:
    """Refuse to resume with a different data order or schedule: the run would silently become
    another one. To train further, start a new run from the checkpoint's weights
    (model=<checkpoint>/model) with its own schedule."""
    defaults = {f"generator_{k}": v for k, v in Config().generator_difficulty().items()}
    checks = [("data order", {**defaults, **state.get("data_order", {})}, _data_order(cfg))]
    if "schedule" in state:  # checkpoints written before it was recorded have no schedule to compare
        checks.append(("schedule", state["schedule"], _schedule(cfg)))
    # what the checkpoint's weights are: full, or adapters of this shape (older checkpoints: full)
    checks.append(("LoRA setting", state.get("lora", {"lora_rank": 0}), _lora(cfg)))
    for what, saved, now in checks:
        changed = {k: (saved.get(k), now.get(k)) for k in {**saved, **now} if saved.get(k) != now.get(k)}
        if changed:
            detail = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in changed.items())
            weights = (f"the merged model of examples/export_merged.py {folder}" if (folder / "adapter").is_dir()
                       else f"model={folder}/model")
            raise ConfigError(f"cannot resume {folder} with a different {what} ({detail}); use the checkpoint's "
                              f"values, or train further in a new output_dir from {weights}")
