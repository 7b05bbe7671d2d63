"""Held-out evaluation (greedy, one completion per task) and text signals of reasoning."""

from __future__ import annotations

import re

from minigrpo import collectives
from minigrpo.rewards import score_completions
from minigrpo.rollout import Sampling


def greedy_sampling(cfg, stop: bool | None = None) -> Sampling:
    """How held-out tasks are answered: one greedy completion of the training length, with the
    training stop strings when `stop` (default: `cfg.eval_stop`), else until the model ends it
    (its end-of-sequence token) or the length runs out, as for a user of the checkpoint."""
    stop = cfg.eval_stop if stop is None else stop
    return Sampling(n=1, max_tokens=cfg.max_completion_length, temperature=0.0,
                    stop=tuple(cfg.stop) if stop else (), seed=0)


# the figures evaluate() computes itself; a reward function with one of these names is refused
FIXED = ("eval/tasks", "eval/with_stop", "eval/success_rate", "eval/completion_length", "eval/format_rate")


def check_reward_names(rewards) -> None:
    """Refuse rewards whose `eval/<name>` would overwrite one of evaluate()'s own figures. The
    trainer calls it at start-up, so a clash cannot surface at the last step's evaluation."""
    taken = sorted(r.name for r in rewards if f"eval/{r.name}" in FIXED)
    if taken:
        raise ValueError(f"reward names collide with evaluation figures: {taken}; rename those reward functions")


def evaluate(rollout, eval_set, rewards, cfg, info, trainer_state=None) -> dict[str, float]:
    """Greedy completions for the first `cfg.eval_num_samples` held-out prompts, split over ranks;
    the rewards receive `trainer_state` as in training.

    Returns `eval/<reward name>` (mean value), `eval/success_rate` (fraction where the success
    reward is exactly 1), `eval/format_rate` when a reward named format_reward is present,
    `eval/completion_length` (mean tokens), `eval/tasks` and `eval/with_stop` (1.0 when generated
    with the training stop strings: `cfg.eval_stop`, see `greedy_sampling`). Empty when there is
    nothing to evaluate (`eval_num_samples` 0 or an empty held-out set), on every rank alike.
    """
    n = min(cfg.eval_num_samples, len(eval_set))
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
    out = {"eval/tasks": count, "eval/with_stop": float(bool(sampling.stop)),
           "eval/success_rate": total["success"] / count, "eval/completion_length": total["length"] / count}
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

