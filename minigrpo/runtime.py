"""Process-level helpers of the training loop: cross-rank reductions, the replica check,
signal handling, phase timers and seeding. Nothing here knows about GRPO."""

from __future__ import annotations

import random
import signal
import time

import numpy as np
import torch
import torch.distributed as dist

def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Average over ranks (max for *_max keys) so rank 0 logs the global picture. A NaN means "not
    measured on this rank" (e.g. logprob_gap when every micro-batch was skipped) and is left out of
    the average; a key no rank measured stays NaN."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    vals = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)  # [K]
    measured = ~vals.isnan()  # [K]
    counts = measured.double()
    maxes = torch.where(measured, vals, torch.tensor(float("-inf"), dtype=torch.float64))
    sums = torch.where(measured, vals, torch.zeros((), dtype=torch.float64))
    dist.all_reduce(sums)
    dist.all_reduce(counts)
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
    nan = float("nan")
    return {k: (nan if counts[i] == 0 else maxes[i].item() if k.endswith("_max") else (sums[i] / counts[i]).item())
            for i, k in enumerate(keys)}


def sum_over_ranks(x: float) -> float:
    t = torch.tensor(float(x), dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.item()


def check_replicas(policy) -> float:
    """A checksum of the weights, and an error if data-parallel replicas have diverged (a silent
    failure mode of mismatched batches or a missed all-reduce). ZeRO-3 shards differ by design,
    so there each rank's shard is summed into one global checksum instead."""
    with torch.no_grad():
        local = sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(policy.module.parameters()))
    local = torch.as_tensor(local, dtype=torch.float64).cpu()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local.item()
    if policy.zero_stage == 3:
        dist.all_reduce(local)
        return local.item()
    lo, hi = local.clone(), local.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if lo.item() != hi.item():
        raise RuntimeError(f"data-parallel replicas diverged: weight checksums range {lo.item()!r} .. {hi.item()!r}")
    return local.item()


class StopOnSignal:
    """SIGINT/SIGTERM set a flag instead of killing the run; the loop checks it after each step,
    agreed over ranks, so every rank saves the same checkpoint. A second signal kills at once."""

    def __init__(self):
        self.flag = False
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with their default handlers
                pass

    def _handle(self, signum, frame):
        if self.flag:
            self.restore()
            raise KeyboardInterrupt
        self.flag = True
        print(f"\n[minigrpo] {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(send it again to stop at once)", flush=True)

    def requested(self) -> bool:
        t = torch.tensor(float(self.flag))
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item() > 0

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class PhaseTimer:
    def __init__(self):
        self.seconds = {k: 0.0 for k in ("generate", "reward", "reference", "train", "push")}

    def __call__(self, name):
        timer = self

        class _Span:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] += time.perf_counter() - self.t

        return _Span()

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()} | {"time/step": sum(self.seconds.values())}
