"""Held-out evaluation and text signals of reasoning.

- `evaluate`: the trainer's in-run evaluation, greedy and cheap (one completion per task, split over
  ranks), with the success rate's 95% Wilson interval.
- `task_outcomes` + `summarize_outcomes`: the full evaluation of `examples/evaluate_countdown.py`:
  per task, greedy success (pass@1) and format, and pass@k (any success in exactly k samples at
  temperature 1.0); per group (e.g. the number count) and overall, each rate with its Wilson
  interval. Two models' outcomes on the same tasks compare with `minigrpo.stats.paired_difference`.
- `arithmetic_audit`: is the arithmetic written in `<think>` still right (a reward-hacking audit:
  the rewards grade only the answer).
- `kl_estimates`: how far a policy moved from another (e.g. its starting checkpoint), per token,
  from log-probs of completions sampled from the policy.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import torch

from minigrpo import collectives
from minigrpo.rewards import repeat_columns, score_completions, think_arithmetic
from minigrpo.rollout import Sampling
from minigrpo.stats import wilson_interval


def greedy_sampling(cfg, stop: bool | None = None) -> Sampling:
    """How held-out tasks are answered: one greedy completion of the training length, with the
    training stop strings when `stop` (default: `cfg.eval_stop`), else until the model ends it
    (its end-of-sequence token) or the length runs out, as for a user of the checkpoint."""
    stop = cfg.eval_stop if stop is None else stop
    return Sampling(n=1, max_tokens=cfg.max_completion_length, temperature=0.0,
                    stop=tuple(cfg.stop) if stop else (), seed=0)


# the figures evaluate() computes itself; a reward function with one of these names is refused
FIXED = ("eval/tasks", "eval/with_stop", "eval/success_rate", "eval/success_rate_low", "eval/success_rate_high",
         "eval/completion_length", "eval/format_rate")


def check_reward_names(rewards) -> None:
    """Refuse rewards whose `eval/<name>` would overwrite one of evaluate()'s own figures. The
    trainer calls it at start-up, so a clash cannot surface at the last step's evaluation."""
    taken = sorted(r.name for r in rewards if f"eval/{r.name}" in FIXED)
    if taken:
        raise ValueError(f"reward names collide with evaluation figures: {taken}; rename those reward functions")


def eval_task_count(cfg, eval_set) -> int:
    """How many held-out tasks `evaluate` answers: the first `eval_num_samples` (0 without a set)."""
    return min(cfg.eval_num_samples, len(eval_set)) if eval_set is not None else 0


def evaluate(rollout, eval_set, rewards, cfg, info, trainer_state=None) -> dict[str, float]:
    """Greedy completions for the first `cfg.eval_num_samples` held-out prompts, split over ranks;
    the rewards receive `trainer_state` as in training.

    Returns `eval/<reward name>` (mean value), `eval/success_rate` (fraction where the success
    reward is exactly 1) with its 95% Wilson interval (`eval/success_rate_low`, `_high`), `eval/format_rate` when a reward named format_reward is present,
    `eval/completion_length` (mean tokens), `eval/tasks` and `eval/with_stop` (1.0 when generated
    with the training stop strings: `cfg.eval_stop`, see `greedy_sampling`). Empty when there is
    nothing to evaluate (`eval_num_samples` 0 or an empty held-out set), on every rank alike.
    """
    n = eval_task_count(cfg, eval_set)
    if n == 0:
        return {}
    check_reward_names(rewards)
    # Every rank answers as many prompts (the last ranks repeat prompt 0 and do not count it): a
    # lockstep engine (ZeRO-3) runs the same forward passes on every rank.
    idx = list(range(info.rank, -(-n // info.world_size) * info.world_size, info.world_size))
    real = [i < n for i in idx]
    prompts, ids, cols = eval_set.select([i if i < n else 0 for i in idx])
    sampling = greedy_sampling(cfg)
    batch = rollout.generate(ids, sampling)
    scores = score_completions(rewards, batch.texts, prompts, cols, 1, completion_ids=batch.completion_ids,
                               trainer_state=trainer_state, on_error=cfg.reward_on_error, timeout_s=cfg.reward_timeout)
    # sums over this rank's real tasks; reward sums under "reward:" so no name can clash with ours
    sums = {"count": float(sum(real)), "length": sum(len(c) for c, r in zip(batch.completion_ids, real) if r),
            "success": sum(v == 1.0 and r for v, r in zip(scores.per_reward.get(cfg.success_reward, []), real)),
            "format": sum(v == 1.0 and r for v, r in zip(scores.per_reward.get("format_reward", []), real))}
    for name, values in scores.per_reward.items():
        sums[f"reward:{name}"] = sum(v or 0.0 for v, r in zip(values, real) if r)
    keys = sorted(sums)
    total = dict(zip(keys, collectives.all_reduce_scalars([float(sums[k]) for k in keys])))
    count = max(total["count"], 1.0)
    low, high = wilson_interval(round(total["success"]), round(count))
    out = {"eval/tasks": count, "eval/with_stop": float(bool(sampling.stop)),
           "eval/success_rate": total["success"] / count, "eval/success_rate_low": low, "eval/success_rate_high": high,
           "eval/completion_length": total["length"] / count}
    if "format_reward" in scores.per_reward:
        out["eval/format_rate"] = total["format"] / count
    out.update({f"eval/{k.removeprefix('reward:')}": v / count for k, v in total.items() if k.startswith("reward:")})
    return out


def phrase_rate(texts: list[str], phrases: list[str]) -> float:
    """Fraction of texts containing any of the phrases (case-insensitive, whole words): the
    self-verification signal ("wait", "let me check", ...) the R1 paper's "aha moment" is about."""
    if not texts or not phrases:
        return 0.0
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(p) for p in phrases) + r")\b", re.IGNORECASE)
    return sum(bool(pattern.search(t)) for t in texts) / len(texts)


@dataclasses.dataclass(frozen=True)
class TaskOutcomes:
    """Per task (one entry each, in the tasks' order): solved by the greedy completion, in the strict
    format, and solved by any of k samples (None when pass@k was not measured)."""

    success: list[bool]
    format: list[bool] | None  # None: no reward named format_reward
    pass_k: list[bool] | None
    k: int
    completion_length: list[int]  # greedy completion tokens
    truncated: list[bool]  # greedy completion cut by the length limit
    texts: list[str]  # the greedy completions


def task_outcomes(engine, tasks, rewards, success_reward: str, greedy: Sampling, k: int = 0,
                  k_seed: int = 0) -> TaskOutcomes:
    """Score every task of `tasks` (a `batching.PromptSet`): one greedy completion (`greedy`, as
    `greedy_sampling` makes it) and, with k > 0, exactly k samples at temperature 1.0 (seeded, same
    length and stop strings as `greedy`). A task is solved when `success_reward` gives exactly 1."""
    batch = engine.generate(tasks.ids, greedy)
    scores = score_completions(rewards, batch.texts, tasks.prompts, tasks.columns, 1, completion_ids=batch.completion_ids)
    solved = [v == 1.0 for v in scores.per_reward[success_reward]]
    fmt = [v == 1.0 for v in scores.per_reward["format_reward"]] if "format_reward" in scores.per_reward else None
    pass_k = None
    if k > 0:
        sampling = dataclasses.replace(greedy, n=k, temperature=1.0, seed=k_seed)
        many = engine.generate(tasks.ids, sampling)  # [n * k], task-major
        many_scores = score_completions(rewards, many.texts, [p for p in tasks.prompts for _ in range(k)],
                                        repeat_columns(tasks.columns, k), k, completion_ids=many.completion_ids)
        hits = [v == 1.0 for v in many_scores.per_reward[success_reward]]
        pass_k = [any(hits[i * k:(i + 1) * k]) for i in range(len(tasks))]
    return TaskOutcomes(solved, fmt, pass_k, k, [len(c) for c in batch.completion_ids], batch.truncated, batch.texts)


def rate(outcomes: Sequence[bool]) -> dict[str, float]:
    """The rate of True among `outcomes`, with its count and 95% Wilson interval."""
    n, hits = len(outcomes), sum(map(bool, outcomes))
    low, high = wilson_interval(hits, n)
    return {"rate": hits / n, "low": low, "high": high, "count": hits, "tasks": n}


def summarize_outcomes(outcomes: TaskOutcomes, groups: Sequence[str]) -> dict:
    """Overall ("all") and per group (`groups[i]`: task i's group, e.g. its number count): `success`
    (greedy, pass@1), `format`, `pass@k`, each a `rate` with its interval, and the mean greedy length."""
    if len(groups) != len(outcomes.success):
        raise ValueError(f"{len(groups)} groups for {len(outcomes.success)} tasks")
    named = {"success": outcomes.success, "format": outcomes.format, f"pass@{outcomes.k}": outcomes.pass_k}

    def one(idx: list[int]) -> dict:
        row = {name: rate([v[i] for i in idx]) for name, v in named.items() if v is not None}
        row["completion_length_mean"] = sum(outcomes.completion_length[i] for i in idx) / len(idx)
        row["truncated_fraction"] = sum(outcomes.truncated[i] for i in idx) / len(idx)
        return row

    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(str(g), []).append(i)
    return {"all": one(list(range(len(groups)))), **{g: one(idx) for g, idx in sorted(members.items())}}


def arithmetic_audit(texts: Sequence[str], solved: Sequence[bool]) -> dict[str, float | int | None]:
    """Of the steps "a op b = c" written in `<think>` (`rewards.think_arithmetic`), how many are right:
    `steps_written`, `steps_correct`, `step_accuracy` (None when none is written), `with_steps` (the
    fraction of completions that write any), and of the solved completions that write steps, the
    fraction whose every step is right (`solved_sound`, None when there is none): an answer graded
    right above reasoning that is nonsense is what answer-only rewards cannot see."""
    if len(texts) != len(solved):
        raise ValueError(f"{len(texts)} texts and {len(solved)} outcomes")
    steps = [think_arithmetic(t) for t in texts]  # [(correct, written)] per completion
    written, correct = sum(w for _, w in steps), sum(c for c, _ in steps)
    solved_with_steps = [c == w for (c, w), ok in zip(steps, solved) if ok and w]
    return {"steps_written": written, "steps_correct": correct,
            "step_accuracy": correct / written if written else None,
            "with_steps": sum(w > 0 for _, w in steps) / len(texts) if texts else None,
            "solved_sound": sum(solved_with_steps) / len(solved_with_steps) if solved_with_steps else None}


def kl_estimates(logprobs: torch.Tensor, other_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """KL(policy || other) per token, from completions sampled from the policy at temperature 1.0.

    Args:
        logprobs: [B, T] log p_policy of each sampled token.
        other_logprobs: [B, T] log p_other of the same tokens.
        mask: [B, T] 1 for real completion tokens, 0 for padding.

    Returns `k1`, the mean of log p - log q (unbiased for the per-token KL, any sign per token), `k3`,
    the mean of exp(q - p) - (q - p) - 1 (unbiased too, never negative: the estimator the GRPO loss
    uses), `tokens` and `sequences`.
    """
    if not (logprobs.shape == other_logprobs.shape == mask.shape):
        raise ValueError(f"shapes differ: {tuple(logprobs.shape)}, {tuple(other_logprobs.shape)}, {tuple(mask.shape)}")
    m = mask.to(torch.float64)
    d = (other_logprobs.double() - logprobs.double()) * m  # [B, T] log q - log p on real tokens
    tokens = float(m.sum())
    if tokens == 0:
        raise ValueError("no completion tokens to estimate a KL on")
    k3 = (torch.exp(d) - d - 1) * m  # [B, T]
    return {"k1": float(-d.sum() / tokens), "k3": float(k3.sum() / tokens), "tokens": int(tokens),
            "sequences": int(mask.shape[0])}
