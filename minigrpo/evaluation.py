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


def evaluate(rollout, eval_set, rewards, cfg, info, trainer_state=None) -> dict[str, float]:
    """Greedy completions for the first `cfg.eval_num_samples` held-out prompts, split over ranks;
    the rewards receive `trainer_state` as in training.

    Returns `eval/<reward name>` (mean value), `eval/success_rate` (fraction where the success
    reward is exactly 1), `eval/format_rate` when a reward named format_reward is present, and
    `eval/completion_length` (mean tokens). Stop strings: `cfg.eval_stop` (`greedy_sampling`).
    """
    n = min(cfg.eval_num_samples, len(eval_set))
    if n == 0:
        return {}
    # Every rank answers as many prompts (the last ranks repeat prompt 0 and do not count it): a
    # lockstep engine (ZeRO-3) runs the same forward passes on every rank.
    idx = list(range(info.rank, -(-n // info.world_size) * info.world_size, info.world_size))
    real = [i < n for i in idx]
    prompts, ids, cols = eval_set.select([i if i < n else 0 for i in idx])
    batch = rollout.generate(ids, greedy_sampling(cfg))
    scores = score_completions(rewards, batch.texts, prompts, cols, 1, completion_ids=batch.completion_ids,
                               trainer_state=trainer_state, on_error=cfg.reward_on_error, timeout_s=cfg.reward_timeout)
    sums = {"count": float(sum(real)), "completion_length": sum(len(c) for c, r in zip(batch.completion_ids, real) if r)}
    for name, values in scores.per_reward.items():
        sums[name] = sum(v or 0.0 for v, r in zip(values, real) if r)
    sums["success"] = sum(v == 1.0 and r for v, r in zip(scores.per_reward.get(cfg.success_reward, []), real))
    sums["format"] = sum(v == 1.0 and r for v, r in zip(scores.per_reward.get("format_reward", []), real))
    keys = sorted(sums)
    total = dict(zip(keys, collectives.all_reduce_scalars([float(sums[k]) for k in keys])))
    count = max(total.pop("count"), 1.0)
    out = {"eval/tasks": count, "eval/success_rate": total.pop("success") / count,
           "eval/completion_length": total.pop("completion_length") / count}
    fmt = total.pop("format")
    if "format_reward" in sums:
        out["eval/format_rate"] = fmt / count
    out.update({f"eval/{k}": v / count for k, v in total.items()})
    return out


def phrase_rate(texts: list[str], phrases: list[str]) -> float:
    """Fraction of texts containing any of the phrases (case-insensitive, whole words): the
    self-verification signal ("wait", "let me check", ...) the R1 paper's "aha moment" is about."""
    if not texts or not phrases:
        return 0.0
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(p) for p in phrases) + r")\b", re.IGNORECASE)
    return sum(bool(pattern.search(t)) for t in texts) / len(texts)

