"""Keeping the rollout engine's weights equal to the policy's: the push after each optimizer step,
and the probe that checks it beside the engine's exact per-weight check.

The engines check every push exactly (integer sums of every weight's bits, `minigrpo.checksum`);
the probe (the engine's log-probs of a fixed text vs the trainer's) is the second check, for a
copy of a weight that an engine derives after loading, which a parameter check cannot see.
"""

from __future__ import annotations

import torch

from minigrpo import collectives
from minigrpo.rollout import Probe, WeightSyncError
from minigrpo.scoring import completion_logprobs

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 12 + 7 = 19."
PROBE_MARGIN, PROBE_FLOOR = 10.0, 1e-3


def sync_weights(rollout, policy, probe_ids: list[int], atol: float | None, version: int | None = None) -> None:
    """New weights into the rollout engine, verified there exactly (every weight's bits) and, given
    a tolerance, by the probe's log-probs scored with the policy. Every rank calls it (ZeRO-3's
    gathers are collective), and every rank learns whether every push took: a push that failed on
    one colocated rank raises there and a `WeightSyncError` on the others, instead of leaving them
    waiting in the next collective until the process group's timeout. (Not covered: an error raised
    inside a ZeRO-3 gather of `pushed_weights` itself, where the ranks are already out of step.)"""
    if rollout.shares_policy_weights:
        return
    probe = Probe(tuple(probe_ids), tuple(probe_logprobs(policy, probe_ids)), atol) if atol is not None else None
    weights = policy.pushed_weights()  # LoRA: merged
    error = None
    try:
        rollout.push_weights(weights, probe, version=version)
    except Exception as e:  # re-raised below, after the other ranks have heard of it
        error = e
        for _ in weights:  # the rest of the gathers (ZeRO-3: collective), so no rank is left in one
            pass
    collectives.raise_if_any(error, WeightSyncError, "the weight push")


def probe_logprobs(policy, probe_ids: list[int]) -> list[float]:
    with torch.no_grad():
        return completion_logprobs(policy.module, [probe_ids[:1]], [probe_ids[1:]], 1.0,
                                   gathered=policy.gathered)[0].float().tolist()


def probe_tolerance(rollout, policy, probe_ids: list[int], fixed: float | None, main: bool) -> float | None:
    """The probe's tolerance: `fixed` (the config's sync_check_atol), or calibrated now, while engine and trainer hold the
    same weights: PROBE_MARGIN x the largest difference of their probe log-probs, at least PROBE_FLOOR.
    (fp32 on CPU: ~1e-6 apart; bf16 kernels on GPUs: ~1e-2.) The exact check of every push does
    not depend on it; the probe is there for copies of weights an engine derives after loading."""
    if rollout.shares_policy_weights:
        return None
    expected = probe_logprobs(policy, probe_ids)
    diff = max(abs(a - b) for a, b in zip(rollout.score([probe_ids])[0], expected, strict=True))
    atol = fixed if fixed is not None else max(PROBE_MARGIN * diff, PROBE_FLOOR)
    if not diff <= atol:
        raise WeightSyncError(f"before training, the engine's probe log-probs already differ from the trainer's "
                              f"by {diff:.3g} > sync_check_atol {atol}")
    if main:
        print(f"[minigrpo] weight-push probe: engine and trainer differ by {diff:.2e} on the same weights; "
              f"tolerance {atol:.2e}", flush=True)
    return atol
