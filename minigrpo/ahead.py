"""Generation ahead of training (`async_generation`): step t+k's batch is generated while step t trains.

k = `max_staleness`. At step t, before the update, the rollout engine holds the weights of step t-1
(pushed at the end of step t-1). `Ahead.next(t)` launches the batch of step t+k now, with those
weights, on a thread, then returns step t's batch (launched k steps earlier). `settle()` waits for
every launched batch before the push of step t's weights, so pushes happen only between
generations and the batch of step s is generated with exactly the weights of step s-1-k (of step 0
for the first k steps): a function of the step, never of timing. Its staleness when trained,
(s-1) - version, is at most k. k = 0 is the synchronous loop, through this code.

The thread only sends HTTP requests to vLLM's server (`VLLMServerEngine.generate`): no collective
runs on it, so the ranks' process group sees the same sequence of collectives as without it.
Rewards are scored when a batch is taken, on the main thread, as in the synchronous loop.

What is launched but not yet trained is part of the loop's state: `to_json` / `from_json` put it
in every checkpoint (per rank), because regenerating it on resume would need weights that are gone.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from minigrpo.batching import prompt_indices, rollout_seed
from minigrpo.rollout import RolloutBatch


@dataclasses.dataclass
class Drawn:
    """One rank's generation round: what it asked for and (once generated) what it got."""

    step: int  # the step that trains on it
    idx: list[int]  # [P] the prompts' indices in the train set
    seed: int  # the sampling seed of the round (batching.rollout_seed)
    position: int  # the data position after this draw
    version: int  # the weights it is generated with: the step they are from (0: the start)
    batch: RolloutBatch | None = None  # [N = P*G]
    seconds: float = 0.0  # how long its generation took (on the thread: not the step's wait)

    def staleness(self) -> int:
        """How many optimizer steps behind the policy that trains on it (step - 1) its weights are."""
        return (self.step - 1) - self.version


def draw(run, step: int, position: int, round_: int = 0, version: int = 0) -> Drawn:
    """The prompts of one generation round of `step` at data `position`, and its seed: the same
    function of (step, position, round) with or without generation ahead."""
    cfg, info = run.cfg, run.info
    idx = prompt_indices(position, len(run.train_set), cfg.prompts_per_step, cfg.seed, info.rank, info.world_size)
    seed = rollout_seed(cfg.seed, step, info.rank, info.world_size, len(idx) * cfg.num_generations, round_)
    return Drawn(step, list(idx), seed, position + cfg.prompts_per_step, version)


def generate(run, drawn: Drawn) -> RolloutBatch:
    """The completions of a drawn round, from the run's rollout engine; records the seconds it took."""
    _, prompt_ids, _ = run.train_set.select(drawn.idx)  # [P]
    start = time.perf_counter()
    batch = run.rollout.generate(prompt_ids, dataclasses.replace(run.sampling, seed=drawn.seed))  # [N]
    drawn.seconds = time.perf_counter() - start
    return batch


def behaviour_logprobs(staleness: int, rollout_correction: str, engine_logprobs):
    """The loss's old log-probs (the ratio's denominator) when the trainer computed none of its own
    (num_iterations 1): None for a batch of the current weights (on-policy: the ratio is 1 in value,
    as in the synchronous loop); for a stale one (generated ahead), the engine's log-probs [n, T], the
    policy that sampled it, so the clipped ratio is pi_theta / pi_behaviour, unless a rollout
    correction weighs the difference instead (then the ratio is on-policy and the correction's
    weight is pi_theta / pi_behaviour, truncated or masked: decoupled PPO)."""
    return engine_logprobs if staleness > 0 and rollout_correction == "none" else None


class Ahead:
    """The batches launched ahead of training, oldest first (see the module docstring)."""

    def __init__(self, max_staleness: int, max_steps: int):
        self.k, self.max_steps = max_staleness, max_steps
        self.pending: OrderedDict[int, Drawn] = OrderedDict()  # step -> its round
        self.futures: dict[int, Future] = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="minigrpo-ahead")

    def next(self, run, step: int, position: int) -> Drawn:
        """Launch every batch up to step + k not launched yet, with the weights the engine holds now
        (those of step - 1), then wait for step's batch and return it. `position`: the data position
        after step - 1 (used only when nothing is pending, at the start or after a resume)."""
        last = max(self.pending, default=step - 1)
        if last >= step:
            position = self.pending[last].position
        for s in range(last + 1, min(step + self.k, self.max_steps) + 1):  # nothing past the last step
            drawn = draw(run, s, position, version=step - 1)
            position = drawn.position
            self.pending[s] = drawn
            self.futures[s] = self.pool.submit(generate, run, drawn)
        self.pending[step].batch = self._result(step)
        drawn = self.pending.pop(step)
        if not 0 <= drawn.staleness() <= self.k:
            raise RuntimeError(f"step {step} got a batch of weights {drawn.version}: staleness {drawn.staleness()} "
                               f"is outside [0, max_staleness={self.k}]")
        return drawn

    def settle(self) -> None:
        """Wait until every launched batch is generated: the engine may then take new weights."""
        for s in list(self.futures):
            self.pending[s].batch = self._result(s)

    def _result(self, step: int) -> RolloutBatch:
        future = self.futures.pop(step, None)
        return self.pending[step].batch if future is None else future.result()  # re-raises the thread's error

    def to_json(self) -> list[dict]:
        """The launched, untrained batches (all generated: call after `settle`), for a checkpoint."""
        if self.futures:
            raise RuntimeError("Ahead.to_json with generations in flight: settle() first")
        return [{**{k: v for k, v in dataclasses.asdict(d).items() if k != "batch"},
                 "batch": dataclasses.asdict(d.batch)} for d in self.pending.values()]

    def from_json(self, saved: list[dict], step: int) -> None:
        """Restore what `to_json` saved after `step`; refuse batches staler than max_staleness allows
        now (a resume with a smaller max_staleness), before any step runs."""
        self.pending = OrderedDict((d["step"], Drawn(**{**d, "batch": RolloutBatch(**d["batch"])})) for d in saved)
        too_old = [d.step for d in self.pending.values() if d.staleness() > self.k]
        if too_old:
            raise ValueError(f"the checkpoint of step {step} holds batches generated ahead for steps {too_old} with "
                             f"weights older than max_staleness={self.k} allows; resume with the run's max_staleness")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
