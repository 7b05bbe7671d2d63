"""The phases of one GRPO step, in the order `trainer.train` calls them:

    collect_rollouts -> compute_advantages -> frozen_logprobs -> update_policy -> push_weights
    -> step_metrics -> (trainer: samples, evaluation, log, checkpoint)

Each phase takes the run's fixed parts (`startup.Run`) and the step's plain data and returns plain
data, so a phase can later run at another time (generation a step ahead) without a second loop.

Legend: P prompts per rank per step, G = num_generations, N = P*G completions per rank (N' <= N: what
dynamic sampling kept), M = gradient_accumulation_steps micro-batches, T longest completion in one.

Departures from the textbook, all deliberate: with num_iterations == 1 the importance ratio is
exp(logp - sg(logp)) (value 1, PPO gradient) instead of using the engine's log-probs, which differ
from the trainer's by float noise (logged as `logprob_gap`, a weight-sync health signal;
`rollout_correction` weights the loss by it instead). Each micro-batch's loss is its share of the
step's loss, with the loss type's token weights taken over the whole step (every micro-batch, every
rank: `minigrpo.algo.normalize`), so the update does not depend on how the step is cut.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch

from minigrpo import collectives, lora
from minigrpo.ahead import behaviour_logprobs, draw, generate
from minigrpo.algo import LOSS_TERMS, group_advantages, grpo_loss, loss_is_zero, loss_metric_names, pooled_std, spread_groups
from minigrpo.algo import token_weights
from minigrpo.engine import PolicyEngine
from minigrpo.evaluation import phrase_rate
from minigrpo.rewards import RewardScores, repeat_columns, score_completions
from minigrpo.rollout import RolloutBatch
from minigrpo.runtime import PhaseTimer, check_replicas, combine_micro_metrics, reduce_metrics, sum_over_ranks
from minigrpo.scoring import completion_logprobs
from minigrpo.startup import Run, trainer_state
from minigrpo.sync import sync_weights


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """One step's scored completions. `batch`, `scores`: the groups this rank trains on (N' = P'*G);
    `generated`, `generated_scores`: every completion generated this step, all rounds (its metrics)."""

    batch: RolloutBatch
    scores: RewardScores
    prompt_texts: list[str]  # [P'] rendered prompts, for the samples file
    generated: RolloutBatch
    generated_scores: RewardScores
    rounds: int  # generation rounds drawn (dynamic sampling: up to dynamic_sampling_max_rounds)
    data_position: int  # the next prompt of the data order once this step's rounds are drawn
    weight_version: int  # the step whose weights generated it (0: the start)
    generate_seconds: float  # the generation's own time (with generation ahead: on the thread, overlapped)
    staleness: int  # optimizer steps between those weights and the policy it trains (0 unless generated ahead)


@dataclasses.dataclass(frozen=True)
class StepBatch:
    """What the update trains on: the rollouts, their advantages and the micro-batch plan. Always
    the configured M micro-batches (DeepSpeed's accumulation count and its collectives): one that
    dynamic sampling left without sequences is a ghost, and runs dummy passes."""

    rollouts: Rollouts
    advantages: torch.Tensor  # [N']
    micro: list[slice]  # [M] slices of this rank's completions
    ghost: list[bool]  # [M] no sequences
    skip: list[bool]  # [M] ghost, or a loss that is provably 0: no forward pass
    ref_logprobs: list | None = None  # [M] of [n, T] (None: a micro-batch without a reference pass); beta 0: None
    old_logprobs: list | None = None  # [M] of [n, T] (None: skipped); num_iterations 1: None


@dataclasses.dataclass(frozen=True)
class Update:
    """What the optimizer steps of one GRPO step did."""

    stats: list[dict]  # the loss metrics of each micro-batch that ran (every iteration)
    grad_norm: float  # of the last optimizer step, before clipping
    logprob_gaps: list[torch.Tensor]  # [] mean |trainer - engine| log-prob per micro-batch of the first iteration
    applied: int  # optimizer steps that changed the weights (a non-finite one is skipped)


# ------------------------------------------------------------------------------------------ 1. rollouts
def collect_rollouts(run: Run, step: int, position: int, timer: PhaseTimer) -> Rollouts:
    """Generate and score: one round is prompts_per_step prompts over the ranks, G completions each.
    With dynamic sampling (DAPO), groups whose rewards are all equal are dropped and rounds are drawn
    until every rank has its share of groups with a spread, or the bound is reached. With generation
    ahead (async_generation), the round was generated earlier (ahead.py) and is only taken here."""
    cfg, G = run.cfg, run.cfg.num_generations
    rounds, need, generated, kept = 0, run.layout.prompts_per_rank, [], []  # generated/kept: per round
    version, seconds = step - 1, []  # the weights the engine holds now; each round's generation time
    while True:
        with timer("generate"):
            if run.ahead is not None:  # launches step + max_staleness, waits for this step's round
                drawn = run.ahead.next(run, step, position)
            else:
                drawn = draw(run, step, position, rounds, version)
                drawn.batch = generate(run, drawn)
        position, version, batch = drawn.position, drawn.version, drawn.batch  # [N]
        seconds.append(drawn.seconds)
        reward_prompts, prompt_ids, columns = run.train_set.select(drawn.idx)  # [P]
        with timer("reward"):
            scores = score_completions(
                run.rewards, batch.texts, [p for p in reward_prompts for _ in range(G)], repeat_columns(columns, G), G,
                completion_ids=batch.completion_ids, trainer_state=trainer_state(cfg, step - 1),
                on_error=cfg.reward_on_error, timeout_s=cfg.reward_timeout,
            )
        groups = list(range(len(prompt_ids)))
        if cfg.dynamic_sampling:  # a rank that has its share still generates (collective engines) but keeps none
            spread = spread_groups(scores.total, G).tolist()  # [P]
            groups = [g for g in groups if spread[g]][:need]
        need -= len(groups)
        generated.append((batch, scores))
        kept.append((batch.groups(groups), scores.groups(groups), [run.train_set.texts[drawn.idx[g]] for g in groups]))
        rounds += 1
        if (not cfg.dynamic_sampling or rounds == cfg.dynamic_sampling_max_rounds
                or collectives.all_reduce_scalars([float(need)], "max")[0] == 0):
            break
    if cfg.vllm_sleep:  # generation is done: vLLM's GPU memory is the policy's until the push
        run.rollout.sleep()
    return Rollouts(
        batch=RolloutBatch.concat([b for b, _, _ in kept]), scores=RewardScores.concat([r for _, r, _ in kept]),
        prompt_texts=[t for _, _, texts in kept for t in texts],
        generated=RolloutBatch.concat([b for b, _ in generated]),
        generated_scores=RewardScores.concat([r for _, r in generated]),
        rounds=rounds, data_position=position, weight_version=version, staleness=(step - 1) - version,
        generate_seconds=sum(seconds),
    )


# ---------------------------------------------------------------------------------------- 2. advantages
def compute_advantages(run: Run, rollouts: Rollouts) -> StepBatch:
    """Group-normalized advantages, and the micro-batches: which are ghosts, which can skip their passes."""
    cfg, layout = run.cfg, run.layout
    total = rollouts.scores.total  # [N']
    batch_std = None  # scale_rewards "batch": the std of every rank's rewards
    if cfg.scale_rewards == "batch":
        r = total.double()
        batch_std = pooled_std(*collectives.all_reduce_scalars([len(r), r.sum().item(), (r * r).sum().item()]))
    advantages = group_advantages(total, cfg.num_generations, cfg.scale_rewards, cfg.advantage_eps, batch_std)  # [N']
    micro = [slice(i, i + layout.micro_batch) for i in range(0, layout.completions_per_rank, layout.micro_batch)]  # [M]
    ghost = [s.start >= len(rollouts.batch) for s in micro]
    skippable = cfg.skip_zero_advantage and run.policy.can_skip_backward
    skip = [g or (skippable and loss_is_zero(advantages[s], cfg.beta, cfg.entropy_coef)) for s, g in zip(micro, ghost)]
    return StepBatch(rollouts, advantages, micro, ghost, skip)


# ------------------------------------------------------------------------------ 3. reference / old log-probs
def frozen_logprobs(run: Run, batch: StepBatch, timer: PhaseTimer) -> StepBatch:
    """The log-probs the update compares with, before any weight changes: the reference's (beta > 0;
    with LoRA the policy with its adapters off) and the policy's own (num_iterations > 1). A ghost
    runs the policy's dummy pass where the real one would run on the policy (ZeRO-3: same gathers)."""
    policy, reference, rollouts = run.policy, run.reference, batch.rollouts.batch
    ref_lp = old_lp = None
    with timer("reference"), torch.no_grad():
        if reference is not None:
            ref_lp = []
            with lora.adapters_disabled(policy.module) if reference is policy else contextlib.nullcontext():
                for s, ghost in zip(batch.micro, batch.ghost):
                    if ghost and reference is policy:
                        policy.ghost_forward()
                    ref_lp.append(None if ghost else _score(reference, rollouts, s, run.cfg))  # [n, T]
        if run.cfg.num_iterations > 1:
            old_lp = []
            for s, skip, ghost in zip(batch.micro, batch.skip, batch.ghost):
                if ghost:
                    policy.ghost_forward()
                old_lp.append(None if skip else _score(policy, rollouts, s, run.cfg))  # [n, T]
    return dataclasses.replace(batch, ref_logprobs=ref_lp, old_logprobs=old_lp)


# -------------------------------------------------------------------------------------------- 4. update
def update_policy(run: Run, batch: StepBatch, timer: PhaseTimer) -> Update:
    """num_iterations passes over the M micro-batches, each a DeepSpeed backward of its share of the
    step's loss; the optimizer steps at the accumulation boundary."""
    cfg, policy, rollouts = run.cfg, run.policy, batch.rollouts.batch
    with timer("train"):
        # the whole step's sequences and tokens, every rank's: the loss type's denominators
        step_seqs, step_tokens = collectives.all_reduce_scalars([len(rollouts), sum(map(len, rollouts.completion_ids))])
        sequence_level = cfg.importance_sampling_level == "sequence"
        stats, grad_norm, gaps, applied = [], float("nan"), [], 0
        for it in range(cfg.num_iterations):
            for k, s in enumerate(batch.micro):
                if batch.ghost[k]:
                    policy.backward_ghost()
                    grad_norm, applied = _after_backward(policy, grad_norm, applied)
                    continue
                skip = batch.skip[k]
                _, mask, engine_lp = rollouts.slice(s).padded(run.tokenizer.pad_token_id)  # [n, T]
                # a skipped micro-batch's metrics come from the engine's log-probs (ratio 1, loss 0);
                # it has no entropy and no rollout correction to report
                lp, ent = (engine_lp, None) if skip else _score(policy, rollouts, s, cfg, with_entropy=True)  # [n, T]
                mask, engine_lp = mask.to(lp.device), engine_lp.to(lp.device)
                loss, m = grpo_loss(
                    lp, (batch.old_logprobs[k] if batch.old_logprobs else
                         behaviour_logprobs(batch.rollouts.staleness, cfg.rollout_correction, engine_lp)) if not skip else None,
                    batch.ref_logprobs[k] if batch.ref_logprobs else None,
                    batch.advantages[s].to(lp.device), mask, beta=cfg.beta,
                    eps_low=cfg.sequence_epsilon if sequence_level else cfg.epsilon,
                    eps_high=cfg.sequence_epsilon_high if sequence_level else cfg.epsilon_high,
                    loss_type=cfg.loss_type, max_completion_length=cfg.max_completion_length,
                    weights=token_weights(mask.to(lp.dtype), cfg.loss_type, cfg.max_completion_length,
                                          step_seqs, step_tokens),
                    importance_sampling_level=cfg.importance_sampling_level, engine_logprobs=engine_lp,
                    rollout_correction="none" if skip else cfg.rollout_correction,
                    correction_cap=cfg.rollout_correction_cap, entropy=ent, entropy_coef=cfg.entropy_coef,
                )
                if skip:
                    policy.backward_zero()
                else:
                    policy.backward(loss)  # the micro-batch's share of the step's loss
                grad_norm, applied = _after_backward(policy, grad_norm, applied)
                stats.append(m)
                if it == 0 and not skip:
                    gaps.append(((lp.detach().float().cpu() - engine_lp.cpu()).abs() * mask.cpu()).sum()
                                / mask.sum().clamp(min=1))
    return Update(stats, grad_norm, gaps, applied)


# ------------------------------------------------------------------------------------------ 5. push
def push_weights(run: Run, step: int, update: Update, timer: PhaseTimer) -> None:
    """Load step `step`'s updated weights into the rollout engine and verify them (exact check and probe)."""
    if run.ahead is not None:  # pushes only between generations: every batch ahead is generated
        with timer("generate"):  # what training did not hide of the generation ahead
            error = None
            try:
                run.ahead.settle()
            except Exception as e:  # re-raised below, after the other ranks have heard of it
                error = e
            # every rank's generation is done, not only rank 0's, before rank 0 pushes
            collectives.raise_if_any(error, RuntimeError, "a generation ahead")
    with timer("push"):
        if run.cfg.vllm_sleep:  # every step, a skipped one too: the next generation needs the engine
            run.rollout.wake_up()
        if update.applied:  # a skipped (non-finite) step changed nothing: the engine is still in sync
            sync_weights(run.rollout, run.policy, run.probe_ids, run.probe_atol, version=step)


# ------------------------------------------------------------------------------------------ 6. metrics
def step_metrics(run: Run, step: int, batch: StepBatch, update: Update, timer: PhaseTimer) -> dict[str, float]:
    """The step's metrics over every rank (rank 0 logs them). Rewards, success and completions: every
    completion generated this step (all rounds); the loss terms: the step's loss, summed over ranks."""
    cfg, G, r = run.cfg, run.cfg.num_generations, batch.rollouts
    success = r.generated_scores.per_reward.get(cfg.success_reward)
    solved = [v == 1.0 for v in success] if success else [False] * len(r.generated)
    lengths = [len(c) for c in r.generated.completion_ids]
    pass_tokens = sum(_forward_tokens(r.batch, s) for s, g in zip(batch.micro, batch.ghost) if not g)  # one pass
    metrics = {
        **r.generated_scores.metrics(),
        # entropy and rollout_is/*: the micro-batches that ran a forward (nan: none did); the loss
        # terms: this rank's part of the step's loss (summed over ranks below)
        **combine_micro_metrics(update.stats, loss_metric_names(cfg.rollout_correction, entropy=True), LOSS_TERMS,
                                cfg.num_iterations),
        "success_rate": float(np.mean(solved)) if success else float("nan"),
        "zero_spread_groups": float(1 - spread_groups(r.generated_scores.total, G).float().mean()),
        "dynamic/rounds": float(r.rounds),
        "grad_norm": update.grad_norm, "lr": run.policy.lr,
        "completion/length_mean": float(np.mean(lengths)), "completion/length_max": float(max(lengths)),
        "completion/truncated_fraction": float(np.mean(r.generated.truncated)),
        "completion/self_verification_rate": phrase_rate(r.generated.texts, cfg.self_verification_phrases),
        "logprob_gap": float(torch.stack(update.logprob_gaps).mean()) if update.logprob_gaps else float("nan"),
        "skipped_micro_batches": float(np.mean(batch.skip)),
        **timer.metrics(), "tokens_per_second": sum(lengths) / max(r.generate_seconds, 1e-9),
        "nonfinite_skipped_steps": float(run.policy.optimizer.skipped),
        # the exact push check's share of time/push (bits sums on both sides)
        "time/push_checksum": getattr(run.rollout, "last_checksum_seconds", 0.0) if update.applied else 0.0,
        # tokens run through the model (a group's shared prompt counts once): for FLOP/s
        "tokens/train": float(pass_tokens * cfg.num_iterations),
        "tokens/reference": float(pass_tokens if run.reference is not None else 0),
    }
    loss_terms = collectives.all_reduce_scalars([metrics.pop(k) for k in LOSS_TERMS])  # the step's: a sum
    metrics = {**reduce_metrics(metrics), **dict(zip(LOSS_TERMS, loss_terms))}
    metrics["batch/completions"] = sum_over_ranks(len(r.batch))  # trained on: prompts_per_step * G (DAPO: up to)
    metrics["dynamic/groups_kept"] = metrics["batch/completions"] / G  # over all ranks
    metrics["dynamic/prompts_drawn"] = float(r.rounds * cfg.prompts_per_step)
    if run.ahead is not None:  # the same on every rank: a function of the step
        metrics["async/staleness"], metrics["async/weight_version"] = float(r.staleness), float(r.weight_version)
        for key in ("ratio_mean", "ratio_max", "clip_fraction", "rollout_is/weight_mean", "rollout_is/ratio_max"):
            if key in metrics:  # the importance ratios by the staleness of the batch they come from
                metrics[f"async/staleness_{r.staleness}/{key}"] = metrics[key]
    if step % cfg.logging_steps == 0 or step == cfg.max_steps:
        metrics["param_checksum"] = check_replicas(run.policy)
    return metrics


# ------------------------------------------------------------------------------------------ helpers
def _score(policy_or_reference, batch: RolloutBatch, s: slice, cfg, with_entropy: bool = False):
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


def _forward_tokens(batch: RolloutBatch, s: slice) -> int:
    """Tokens `completion_logprobs` runs for this micro-batch: each run of identical prompts once."""
    prompts = batch.prompt_ids[s]
    unique = sum(len(p) for i, p in enumerate(prompts) if i == 0 or p != prompts[i - 1])
    return unique + sum(len(c) for c in batch.completion_ids[s])
