"""Process-level helpers of the training loop: cross-rank reductions, the replica check,
signal handling, phase timers and seeding. Nothing here knows about GRPO."""

from __future__ import annotations

import math
import random
import signal
import time

import numpy as np
import torch

from minigrpo import collectives
from minigrpo.checksum import bits_sum


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Average over ranks (max for *_max keys) so rank 0 logs the global picture. A NaN means "not
    measured on this rank" (e.g. logprob_gap when every micro-batch was skipped) and is left out of
    the average; a key no rank measured stays NaN."""
    if not collectives.active():
        return metrics
    keys = sorted(metrics)
    vals = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)  # [K]
    measured = ~vals.isnan()  # [K]
    sums = collectives.all_reduce(torch.where(measured, vals, torch.zeros((), dtype=torch.float64)))  # [K]
    counts = collectives.all_reduce(measured.double())  # [K]
    maxes = collectives.all_reduce(torch.where(measured, vals, torch.tensor(float("-inf"), dtype=torch.float64)), "max")
    nan = float("nan")
    return {k: (nan if counts[i] == 0 else maxes[i].item() if k.endswith("_max") else (sums[i] / counts[i]).item())
            for i, k in enumerate(keys)}


def combine_micro_metrics(stats: list[dict[str, float]], keys, summed=(), per: int = 1) -> dict[str, float]:
    """One rank's step metrics `keys` from its micro-batches' loss metrics: the max of *_max keys,
    the sum of `summed` keys divided by `per` (loss terms: each micro-batch's is its share of the
    step's, and every micro-batch ran `per` = num_iterations times; a ghost micro-batch adds an
    exact 0, so no micro-batch gives 0), the mean of the others, each over the micro-batches that
    report it (a skipped micro-batch reports no entropy and no rollout correction); NaN where none
    does. Every rank returns the same keys (`reduce_metrics` reduces them by position)."""
    out = {}
    for k in keys:
        vals = [m[k] for m in stats if k in m and not math.isnan(m[k])]
        if k in summed:
            out[k] = sum(vals) / per
        else:
            out[k] = (max(vals) if k.endswith("_max") else sum(vals) / len(vals)) if vals else float("nan")
    return out


def sum_over_ranks(x: float) -> float:
    return collectives.all_reduce_scalars([float(x)])[0]


def check_replicas(policy) -> float:
    """A checksum of the weights, sum over parameters i of (i + 1) * sum(parameter i), and an
    error if data-parallel copies of a parameter differ between ranks (a silent failure mode of
    mismatched batches or a missed all-reduce).

    Under ZeRO-3 the checksum adds up every rank's partitions, so it covers every weight; the
    copies compared are the parameters DeepSpeed keeps whole on every rank. The comparison is of
    exact integer sums of the bits (minigrpo.checksum), so one differing ulp is caught."""
    shards, replicas = policy.checksum_views()
    with torch.no_grad():
        zero = torch.zeros((), dtype=torch.float64)
        part = sum((_sum64(t) * (i + 1) for i, t in shards), zero)
        whole = sum((_sum64(t) * (i + 1) for i, t in replicas), zero)
    total = collectives.all_reduce(part).item() if shards else whole.item()
    if collectives.active() and replicas:
        bits = [bits_sum(t) for _, t in replicas]
        # The exact sum can outgrow int64 for a large model; modulo the prime 2**61 - 1 it fits,
        # and a difference of one in the sum still changes it.
        fingerprint = torch.tensor([sum(bits) % (2**61 - 1)], dtype=torch.int64)
        lo, hi = collectives.all_reduce(fingerprint, "min").item(), collectives.all_reduce(fingerprint, "max").item()
        if lo != hi:
            raise RuntimeError(f"data-parallel replicas diverged: weight fingerprints range {lo} .. {hi} "
                               f"(checksum on rank {collectives.rank()}: {total!r})")
    return total


def _sum64(t: torch.Tensor, chunk: int = 2**22) -> torch.Tensor:
    """The sum of `t` in float64, on the CPU, a chunk of 4M elements at a time: `t.double()` would copy the
    whole tensor (a 3B model's embedding: ~2.5 GB in fp64) at every logging step, and so does
    `t.sum(dtype=torch.float64)` on CPU (measured: the same 388 MB extra for 50M elements)."""
    flat = t.reshape(-1)
    return sum((c.double().sum() for c in flat.split(chunk)), torch.zeros((), dtype=torch.float64, device=t.device)).cpu()


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
        return collectives.all_reduce_scalars([float(self.flag)], "max")[0] > 0

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def __enter__(self) -> StopOnSignal:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()  # the caller's handlers back, however the loop ended


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class PhaseTimer:
    """Seconds per phase of one step; `current` is the phase running now (the step bar shows it)."""

    def __init__(self):
        # the phases' names: the step bar words them (runlog.PHASE_WORDS), metrics.jsonl has time/<name>
        self.seconds = {k: 0.0 for k in ("generate", "reward", "reference", "train", "push")}
        self.current: str | None = None

    def __call__(self, name):
        timer = self

        class _Span:
            def __enter__(self):
                self.t = time.perf_counter()
                timer.current = name

            def __exit__(self, *exc):
                timer.seconds[name] += time.perf_counter() - self.t
                timer.current = None

        return _Span()

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()} | {"time/step": sum(self.seconds.values())}
