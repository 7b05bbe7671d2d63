"""The GRPO training loop: `train()` reads top to bottom, one optimizer step per iteration.

Legend: P prompts per rank per step, G = num_generations, N = P*G completions per rank,
T longest completion in a micro-batch.

Each step: prompts -> rollout -> rewards -> advantages -> reference (and old) log-probs ->
DeepSpeed update over micro-batches -> weight push into the rollout engine -> log/eval/save.
Departures from the textbook, all deliberate: with num_iterations == 1 the importance ratio is
exp(logp - sg(logp)) (value 1, PPO gradient) instead of using the engine's log-probs, which
differ from the trainer's by float noise (logged as `logprob_gap`, a weight-sync health signal;
`rollout_correction` weights the loss by it instead). Each micro-batch's loss is its share of
the step's loss, with the loss type's token weights taken over the whole step (every micro-batch,
every rank: `minigrpo.algo.normalize`), so the update does not depend on how the step is cut.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import torch

from minigrpo import checkpoint as ckpt
from minigrpo import collectives, lora
from minigrpo.algo import (LOSS_TERMS, group_advantages, grpo_loss, loss_is_zero, loss_metric_names, pooled_std, spread_groups,
                           token_weights)
from minigrpo.batching import prepare_prompts, prompt_indices, required_columns, reward_columns, rollout_seed
from minigrpo.config import Config, ConfigError
from minigrpo.engine import PolicyEngine, init_distributed, warmup_steps
from minigrpo.evaluation import check_reward_names, evaluate, phrase_rate
from minigrpo.models import load_causal_lm, load_tokenizer, resolve_model, set_transformers_log_level
from minigrpo.rewards import REWARD_ARGUMENTS, Reward, RewardScores, repeat_columns, score_completions
from minigrpo.rewards.isolation import accepted_keywords
from minigrpo.rollout import RolloutBatch, Sampling, make_engine
from minigrpo.runlog import Progress, RunLog, before_after, eval_line
from minigrpo.runtime import (PhaseTimer, StopOnSignal, check_replicas, combine_micro_metrics, reduce_metrics,
                              seed_everything, sum_over_ranks)
from minigrpo.scoring import completion_logprobs
from minigrpo.sync import PROBE_TEXT, probe_tolerance, sync_weights


@dataclasses.dataclass(frozen=True)
class TrainerState:
    """What rewards receive as `trainer_state=` (TRL's name and fields): `global_step` optimizer
    updates are done, of `max_steps` in the run. As in TRL these count updates: a minigrpo step makes
    num_iterations of them, so while step k's completions are scored global_step = (k - 1) * num_iterations."""

    global_step: int
    max_steps: int


def _trainer_state(cfg: Config, steps_done: int) -> TrainerState:
    return TrainerState(steps_done * cfg.num_iterations, cfg.max_steps * cfg.num_iterations)


def train(cfg: Config, rewards: list, train_dataset, eval_dataset=None, template=None, resume: bool = False) -> Path:
    """Train with GRPO; returns the output directory. `rewards`: functions or `Reward`s."""
    # ---------------------------------------------------------------- checks before heavy work
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
    set_transformers_log_level(cfg.log_level)
    model_path = resolve_model(cfg.model, cfg.model_cache_dir)  # a bad path fails here, in one line
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    train_set = prepare_prompts(train_dataset, tokenizer, template, cfg.max_prompt_length)  # too long: error
    eval_set = prepare_prompts(eval_dataset, tokenizer, template, cfg.max_prompt_length) if eval_dataset else None

    # ---------------------------------------------------------------- processes, models, engines
    info = init_distributed(cfg.log_level)
    layout = cfg.layout(info.world_size)
    main = info.rank == 0
    G = cfg.num_generations
    seed_everything(cfg.seed + info.rank)
    device = torch.device(f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, cfg.dtype)
    if cfg.lora_quantize:  # Q-LoRA: quantized while loading onto the device (a 4-bit model does not move)
        model = load_causal_lm(model_path, dtype, cfg.trust_remote_code, quantize=cfg.lora_quantize, device=device)
    else:
        model = load_causal_lm(model_path, dtype, cfg.trust_remote_code).to(device)
    adapter = None  # LoRA: what a checkpoint's adapter/ folder records
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
    memory = {"gpu_memory_utilization": cfg.vllm_gpu_memory_utilization, "kv_cache_gib": cfg.vllm_kv_cache_gib}
    rollout = make_engine(
        cfg.rollout, model_path, policy=policy.module, tokenizer=tokenizer, dtype=cfg.dtype,
        lockstep=policy.zero_stage == 3 and info.world_size > 1,  # rollout=torch: ZeRO-3 forwards are collective
        seed=cfg.seed + info.rank, max_model_len=cfg.max_prompt_length + cfg.max_completion_length,
        trust_remote_code=cfg.trust_remote_code, enforce_eager=cfg.vllm_enforce_eager,
        server_host=cfg.vllm_server_host, server_port=cfg.vllm_server_port, server_timeout=cfg.vllm_server_timeout,
        server_devices=cfg.vllm_server_devices,  # the server_* options: rollout=vllm_server only
        tensor_parallel_size=cfg.vllm_server_tensor_parallel_size, log_level=cfg.log_level,
        **{k: v for k, v in memory.items() if v is not None},
    )
    probe_ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]

    start = 0
    last = ckpt.latest_checkpoint(out) if resume else None
    if resume and last is None and main:
        print(f"[minigrpo] --resume: no complete checkpoint in {out / 'checkpoints'}; starting from step 0")
    nonfinite_in_a_row, position = 0, 0  # position: the next prompt of the data order (batching.py)
    if last is not None:
        _check_same_run(ckpt.read_state(last), cfg, last)  # before loading: a LoRA shape change would fail inside
        state = ckpt.restore(last, policy, info.rank)
        start, nonfinite_in_a_row, position = state["step"], state["nonfinite_in_a_row"], state["data_position"]
        policy.optimizer.skipped = state["nonfinite_skipped_steps"]
        if main:
            print(f"[minigrpo] resumed from {last} (step {start})")
    if last is not None or cfg.lora_quantize:
        # The engine loaded the model's own weights; the policy is a checkpoint's, or (Q-LoRA) the
        # dequantized 4-bit base. Pushed with the exact check only: the probe is calibrated next.
        sync_weights(rollout, policy, probe_ids, None)
    probe_atol = probe_tolerance(rollout, policy, probe_ids, cfg.sync_check_atol, main)  # same weights on both sides now
    log = RunLog(out, main, resume_step=start)
    if main:
        cfg.save(out / "config.yaml")
    sampling = Sampling(n=G, max_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                        top_p=cfg.top_p, top_k=cfg.top_k, stop=tuple(cfg.stop))
    eval_how = f"greedy, {'with the training' if cfg.eval_stop and cfg.stop else 'without'} stop strings"
    if start == 0 and eval_set is not None and cfg.eval_before_training:  # the summary's "before"
        before = evaluate(rollout, eval_set, rewards, cfg, info, _trainer_state(cfg, 0))
        if before:  # empty with eval_num_samples 0: no row, on every rank alike
            log.log(0, before)
        if main and before:
            print(f"[minigrpo] step 0, before training: held-out {eval_line(before)} ({eval_how})")
    progress = Progress(main, start, cfg.max_steps)
    stop = StopOnSignal()  # SIGINT/SIGTERM: finish this step, checkpoint, exit

    for step in range(start + 1, cfg.max_steps + 1):
        timer = PhaseTimer()
        # ------------------------------------------------------------ 1-3. prompts -> rollout -> rewards
        # One round: prompts_per_step prompts over the ranks, G completions each, scored. With
        # dynamic sampling (DAPO), groups whose rewards are all equal are dropped and rounds are
        # drawn until every rank has its share of groups with a spread, or the bound is reached.
        rounds, need, generated, kept = 0, layout.prompts_per_rank, [], []  # generated/kept: per round
        while True:
            idx = prompt_indices(position, len(train_set), cfg.prompts_per_step, cfg.seed, info.rank, info.world_size)
            position += cfg.prompts_per_step  # every rank, every round: the position stays global
            reward_prompts, prompt_ids, columns = train_set.select(idx)  # [P]
            with timer("generate"):
                seed = rollout_seed(cfg.seed, step, info.rank, info.world_size, len(prompt_ids) * G, rounds)
                batch = rollout.generate(prompt_ids, dataclasses.replace(sampling, seed=seed))  # N completions
            with timer("reward"):
                scores = score_completions(
                    rewards, batch.texts, [p for p in reward_prompts for _ in range(G)], repeat_columns(columns, G), G,
                    completion_ids=batch.completion_ids, trainer_state=_trainer_state(cfg, step - 1),
                    on_error=cfg.reward_on_error, timeout_s=cfg.reward_timeout,
                )
            groups = list(range(len(prompt_ids)))
            if cfg.dynamic_sampling:  # a rank that has its share still generates (collective engines) but keeps none
                spread = spread_groups(scores.total, G).tolist()  # [P]
                groups = [g for g in groups if spread[g]][:need]
            need -= len(groups)
            generated.append((batch, scores))
            kept.append((batch.groups(groups), scores.groups(groups), [train_set.texts[idx[g]] for g in groups]))
            rounds += 1
            if (not cfg.dynamic_sampling or rounds == cfg.dynamic_sampling_max_rounds
                    or collectives.all_reduce_scalars([float(need)], "max")[0] == 0):
                break
        batch = RolloutBatch.concat([b for b, _, _ in kept])  # what this rank trains on
        scores = RewardScores.concat([r for _, r, _ in kept])
        prompt_texts = [t for _, _, texts in kept for t in texts]  # [P'] rendered, for the samples
        all_batch = RolloutBatch.concat([b for b, _ in generated])  # every completion generated: the metrics
        all_scores = RewardScores.concat([r for _, r in generated])
        batch_std = None  # scale_rewards "batch": the std of every rank's rewards
        if cfg.scale_rewards == "batch":
            r = scores.total.double()
            batch_std = pooled_std(*collectives.all_reduce_scalars([len(r), r.sum().item(), (r * r).sum().item()]))
        advantages = group_advantages(scores.total, G, cfg.scale_rewards, cfg.advantage_eps, batch_std)  # [N]

        # ------------------------------------------------------------ 4. reference / old log-probs
        # Always the configured number of micro-batches (DeepSpeed's accumulation count and its
        # collectives): one that dynamic sampling left without sequences is a ghost.
        micro = [slice(i, i + layout.micro_batch) for i in range(0, layout.completions_per_rank, layout.micro_batch)]
        ghost = [s.start >= len(batch) for s in micro]
        zero = [g or (cfg.skip_zero_advantage and policy.can_skip_backward
                      and loss_is_zero(advantages[s], cfg.beta, cfg.entropy_coef)) for s, g in zip(micro, ghost)]
        with timer("reference"), torch.no_grad():
            with lora.adapters_disabled(policy.module) if reference is policy else contextlib.nullcontext():
                # LoRA's reference is the policy: at ZeRO-3 a ghost runs its dummy pass (same gathers)
                ref_lp = ([(policy.ghost_forward() if reference is policy else None) if g
                           else _score(reference, batch, s, cfg) for s, g in zip(micro, ghost)]
                          if reference is not None else None)
            old_lp = ([policy.ghost_forward() if g else None if z else _score(policy, batch, s, cfg)
                       for s, z, g in zip(micro, zero, ghost)] if cfg.num_iterations > 1 else None)

        # ------------------------------------------------------------ 5. update (DeepSpeed)
        with timer("train"):
            # the whole step's sequences and tokens, every rank's: the loss type's denominators
            step_seqs, step_tokens = collectives.all_reduce_scalars([len(batch), sum(map(len, batch.completion_ids))])
            sequence_level = cfg.importance_sampling_level == "sequence"
            stats, grad_norm, gap, applied = [], float("nan"), [], 0
            for it in range(cfg.num_iterations):
                for k, s in enumerate(micro):
                    if ghost[k]:
                        policy.backward_ghost()
                        grad_norm, applied = _after_backward(policy, grad_norm, applied)
                        continue
                    _, mask, engine_lp = batch.slice(s).padded(tokenizer.pad_token_id)
                    # a skipped micro-batch's metrics come from the engine's log-probs (ratio 1, loss 0);
                    # it has no entropy and no rollout correction to report
                    lp, ent = (engine_lp, None) if zero[k] else _score(policy, batch, s, cfg, with_entropy=True)  # [n, T]
                    mask, engine_lp = mask.to(lp.device), engine_lp.to(lp.device)
                    loss, m = grpo_loss(
                        lp, old_lp[k] if old_lp and not zero[k] else None, ref_lp[k] if ref_lp else None,
                        advantages[s].to(lp.device), mask, beta=cfg.beta,
                        eps_low=cfg.sequence_epsilon if sequence_level else cfg.epsilon,
                        eps_high=cfg.sequence_epsilon_high if sequence_level else cfg.epsilon_high,
                        loss_type=cfg.loss_type, max_completion_length=cfg.max_completion_length,
                        weights=token_weights(mask.to(lp.dtype), cfg.loss_type, cfg.max_completion_length,
                                              step_seqs, step_tokens),
                        importance_sampling_level=cfg.importance_sampling_level, engine_logprobs=engine_lp,
                        rollout_correction="none" if zero[k] else cfg.rollout_correction,
                        correction_cap=cfg.rollout_correction_cap, entropy=ent, entropy_coef=cfg.entropy_coef,
                    )
                    if zero[k]:
                        policy.backward_zero()
                    else:
                        policy.backward(loss)  # the micro-batch's share of the step's loss
                    grad_norm, applied = _after_backward(policy, grad_norm, applied)
                    stats.append(m)
                    if it == 0 and not zero[k]:
                        gap.append(((lp.detach().float().cpu() - engine_lp.cpu()).abs() * mask.cpu()).sum()
                                   / mask.sum().clamp(min=1))

        # ------------------------------------------------------------ 6. weight push
        with timer("push"):
            if applied:  # a skipped (non-finite) step changed nothing: the engine is still in sync
                sync_weights(rollout, policy, probe_ids, probe_atol)
        nonfinite_in_a_row = 0 if applied else nonfinite_in_a_row + 1

        # ------------------------------------------------------------ 7. log, samples, eval, save
        # rewards, success and completions: every completion generated this step (all rounds)
        success = all_scores.per_reward.get(cfg.success_reward)
        solved = [v == 1.0 for v in success] if success else [False] * len(all_batch)
        lengths = [len(c) for c in all_batch.completion_ids]
        pass_tokens = sum(_forward_tokens(batch, s) for s, g in zip(micro, ghost) if not g)  # one pass over the batch
        metrics = {
            **all_scores.metrics(),
            # entropy and rollout_is/*: the micro-batches that ran a forward (nan: none did); the loss
            # terms: this rank's part of the step's loss (summed over ranks below)
            **combine_micro_metrics(stats, loss_metric_names(cfg.rollout_correction, entropy=True), LOSS_TERMS,
                                    cfg.num_iterations),
            "success_rate": float(np.mean(solved)) if success else float("nan"),
            "zero_spread_groups": float(1 - spread_groups(all_scores.total, G).float().mean()),
            "dynamic/rounds": float(rounds),
            "grad_norm": grad_norm, "lr": policy.lr,
            "completion/length_mean": float(np.mean(lengths)), "completion/length_max": float(max(lengths)),
            "completion/truncated_fraction": float(np.mean(all_batch.truncated)),
            "completion/self_verification_rate": phrase_rate(all_batch.texts, cfg.self_verification_phrases),
            "logprob_gap": float(torch.stack(gap).mean()) if gap else float("nan"),  # nan: all skipped
            "skipped_micro_batches": float(np.mean(zero)),
            **timer.metrics(), "tokens_per_second": sum(lengths) / max(timer.seconds["generate"], 1e-9),
            "nonfinite_skipped_steps": float(policy.optimizer.skipped),
            # the exact push check's share of time/push (bits sums on both sides)
            "time/push_checksum": getattr(rollout, "last_checksum_seconds", 0.0) if applied else 0.0,
            # tokens run through the model (a group's shared prompt counts once): for FLOP/s
            "tokens/train": float(pass_tokens * cfg.num_iterations),
            "tokens/reference": float(pass_tokens if reference is not None else 0),
        }
        loss_terms = collectives.all_reduce_scalars([metrics.pop(k) for k in LOSS_TERMS])  # the step's: a sum
        metrics = {**reduce_metrics(metrics), **dict(zip(LOSS_TERMS, loss_terms))}
        metrics["batch/completions"] = sum_over_ranks(len(batch))  # trained on: prompts_per_step * G (DAPO: up to)
        metrics["dynamic/groups_kept"] = metrics["batch/completions"] / G  # over all ranks
        metrics["dynamic/prompts_drawn"] = float(rounds * cfg.prompts_per_step)
        if step % cfg.logging_steps == 0 or step == cfg.max_steps:
            metrics["param_checksum"] = check_replicas(policy)
        if main:
            kept_solved = [v == 1.0 for v in scores.per_reward[cfg.success_reward]] if success else [False] * len(batch)
            log.samples(step, [t for t in prompt_texts for _ in range(G)], batch.texts, scores.total.tolist(), kept_solved,
                        cfg.num_completion_samples)
        if eval_set is not None and (step == cfg.max_steps or (cfg.eval_steps and step % cfg.eval_steps == 0)):
            metrics.update(evaluate(rollout, eval_set, rewards, cfg, info, _trainer_state(cfg, step)))
        log.log(step, metrics)
        if main and (step % cfg.logging_steps == 0 or step == cfg.max_steps):
            progress.update(step, metrics)
            log.curves()
        interrupted = stop.requested()
        if nonfinite_in_a_row >= cfg.max_nonfinite_steps or interrupted or step == cfg.max_steps or (
            cfg.save_steps and step % cfg.save_steps == 0
        ):
            state = {"step": step, "data_position": position,
                     "nonfinite_skipped_steps": policy.optimizer.skipped, "nonfinite_in_a_row": nonfinite_in_a_row,
                     "data_order": _data_order(cfg), "schedule": _schedule(cfg), "lora": _lora(cfg)}
            saved = ckpt.save(out, step, policy, tokenizer, state, info.rank, cfg.save_total_limit, adapter)
        if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
            raise RuntimeError(
                f"{nonfinite_in_a_row} steps in a row had NaN/inf gradients and were skipped; stopping. "
                f"The last good weights are in {saved} (lower learning_rate or max_grad_norm, check rewards)"
            )
        if interrupted:
            if main:
                print(f"\n[minigrpo] interrupted: step {step} finished and saved to {saved}. "
                      f"Resume with the same command plus --resume (train(..., resume=True)).")
            break
    stop.restore()
    progress.close()
    summary = before_after(log.history, eval_how) if main else None
    if summary:
        print(f"[minigrpo] {summary}")
    log.close()
    return out


def _data_order(cfg: Config) -> dict:
    """The settings that decide which prompts step k trains on (see batching.prompt_indices), the
    generator's difficulty included (checkpoints from before it was recorded: the defaults)."""
    keys = ("seed", "prompts_per_step", "num_generations", "dataset", "dataset_size", "test_size",
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


def _check_same_run(state: dict, cfg: Config, folder: Path) -> None:
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


def _score(policy_or_reference, batch, s: slice, cfg: Config, with_entropy: bool = False):
    """[n, T] log-probs of the micro-batch's completion tokens under the policy (a PolicyEngine) or
    the reference (a plain module); with_entropy: and the [n, T] entropies."""
    if isinstance(policy_or_reference, PolicyEngine):
        model, gathered = policy_or_reference.module, policy_or_reference.gathered
    else:
        model, gathered = policy_or_reference, None
    return completion_logprobs(model, batch.prompt_ids[s], batch.completion_ids[s], cfg.temperature,
                               cfg.logprob_chunk_tokens, gathered=gathered, with_entropy=with_entropy)


def _after_backward(policy: PolicyEngine, grad_norm: float, applied: int) -> tuple[float, int]:
    """Step the optimizer and schedule at the accumulation boundary; (grad norm, applied updates)."""
    norm = policy.step()
    if norm is None:  # not a boundary
        return grad_norm, applied
    return norm, applied + (not policy.last_step_skipped)  # the optimizer ran, or skipped a non-finite step


def _forward_tokens(batch, s: slice) -> int:
    """Tokens `completion_logprobs` runs for this micro-batch: each run of identical prompts once."""
    prompts = batch.prompt_ids[s]
    unique = sum(len(p) for i, p in enumerate(prompts) if i == 0 or p != prompts[i - 1])
    return unique + sum(len(c) for c in batch.completion_ids[s])
