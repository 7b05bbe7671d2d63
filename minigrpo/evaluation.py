"""Held-out evaluation (greedy, one completion per task) and text signals of reasoning."""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from minigrpo.rewards import score_completions
from minigrpo.rollout import Sampling


def greedy_sampling(cfg) -> Sampling:
    """How held-out tasks are answered: one greedy completion, with the training length and stop strings."""
    return Sampling(n=1, max_tokens=cfg.max_completion_length, temperature=0.0, stop=tuple(cfg.stop), seed=0)


def evaluate(rollout, eval_set, rewards, cfg, info) -> dict[str, float]:
    """Greedy completions for the first `cfg.eval_num_samples` held-out prompts, split over ranks.

    Returns `eval/<reward name>` (mean value), `eval/success_rate` (fraction where the success
    reward is exactly 1), and `eval/format_rate` when a reward named format_reward is present.
    """
    n = min(cfg.eval_num_samples, len(eval_set))
    idx = list(range(info.rank, n, info.world_size))
    sums = {r.name: 0.0 for r in rewards} | {"success": 0.0, "format": 0.0, "count": float(len(idx))}
    if idx:
        texts, ids, cols = eval_set.select(idx)
        batch = rollout.generate(ids, greedy_sampling(cfg))
        scores = score_completions(rewards, batch.texts, texts, cols, 1,
                                   on_error=cfg.reward_on_error, timeout_s=cfg.reward_timeout)
        for name, values in scores.per_reward.items():
            sums[name] = sum(v or 0.0 for v in values)
        sums["success"] = sum(v == 1.0 for v in scores.per_reward.get(cfg.success_reward, []))
        sums["format"] = sum(v == 1.0 for v in scores.per_reward.get("format_reward", []))
    keys = sorted(sums)
    vec = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(vec)
    total = dict(zip(keys, vec.tolist()))
    count = max(total.pop("count"), 1.0)
    out = {"eval/success_rate": total.pop("success") / count}
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
