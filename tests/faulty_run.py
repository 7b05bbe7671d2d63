"""The tiny task (tests/tiny_task.py) with faults injected, for tests/test_reliability.py.

    python tests/faulty_run.py MODEL_DIR OUT_DIR [--rewards=says_a,raises_on_b,...] [--nan-at=2,4]
                               [--hang-at=K] [--break-push-at=K [--push-fault=KIND]] [--resume] [key=value ...]

--rewards=A,B      train on these rewards (default says_a): the functions below or tiny_task's
--nan-at=K,...     multiply the loss by NaN at these steps (every micro-batch of the step)
--scale-loss-at=K:F  multiply the loss by F at step K (a finite spike of the loss and grad norm)
--oom-at=K         the loss of step K raises torch.OutOfMemoryError, as CUDA's allocator would
--record-sleep     with vllm_sleep=true: the engine is made without vLLM's sleep mode (vLLM-CPU refuses
                   it) and its sleep/wake_up calls only print `[faulty] sleep K` / `[faulty] wake K`
--hang-at=K        the reward `hangs_at_step` sleeps for 1e6 s from step K on (0.0 before)
--break-push-at=K  from step K on the vLLM weight push is broken, as --push-fault says:
--push-fault=KIND  nothing (default: `_load_chunk` loads nothing), skip (one tensor is left out),
                   ulp (one element of one tensor is loaded one ulp off), swap (a layer's q and k trade
                   places), transpose (a layer's q is loaded transposed)
--break-push-rank=R  break the push on rank R only (default: every rank)
--diverge-at=K     after step K's update, rank 1 moves one element of one weight by one ulp (its
                   replica diverges from rank 0's; run with 2 ranks)
--shift-engine-logprobs=D  the rollout engine reports every sampled token's log-prob D higher than it
                   is (a known trainer/engine mismatch, for the rollout correction)

The faults are injected by wrapping names the step's phases look up at call time
(`minigrpo.phases.grpo_loss`, `score_completions`, `sync_weights`, `minigrpo.ahead.rollout_seed`, and the resume
push's `minigrpo.startup.sync_weights`); nothing in minigrpo is changed. One line per event goes to stdout for the test to read:

    [faulty] step K                  step K began (its prompts were chosen)
    [faulty] reward K <time>         step K's rewards were called at time.time() <time>
    [faulty] push K                  the trainer pushed the weights after step K (0: on resume)
    [faulty] error <time> <Type>: <message>     train() raised; the exit code is then 1
"""

from __future__ import annotations

import os
import sys
import time

from tiny_task import REWARDS as TASK_REWARDS
from tiny_task import TINY_DEFAULTS, eager_everywhere, tiny_dataset

STEP = 0  # the step being run; forked reward processes inherit it
NUM_ITERATIONS = 1  # the run's num_iterations: rewards' trainer_state counts updates
HANG_AT = 10**9
OOM_AT = -1


def constant(completions, **_):
    """1.0 for every completion: every group has zero spread, so every advantage is 0."""
    return [1.0] * len(completions)


def first_letter(completions, **_):
    """Alphabet position of the completion's first letter / 26 (0 if it has none): a reward that
    differs between almost any two completions, so every group has a learning signal."""
    return [(ord(c.strip()[0]) - ord("a") + 1) / 26 if c.strip() else 0.0 for c in completions]


def raises_on_b(completions, **_):
    """0.5 for each completion, but raises on any completion containing the word "b" (~1 in 4)."""
    for c in completions:
        if "b" in c.split():
            raise ValueError(f"cannot score {c!r}")
    return [0.5] * len(completions)


def hangs_at_step(completions, **_):
    """0.0 before step HANG_AT; from then on it never returns."""
    if STEP >= HANG_AT:
        time.sleep(1e6)
    return [0.0] * len(completions)


# the tiny task's own rewards, plus the ones above
REWARDS = {**TASK_REWARDS, **{f.__name__: f for f in (constant, first_letter, raises_on_b, hangs_at_step)}}


def _event(text: str) -> None:
    # one write, line and newline together: two ranks share the pipe, and print() writes the newline
    # separately, which let one rank's line run into the other's (seen under load)
    sys.stdout.write(f"[faulty] {text}\n")
    sys.stdout.flush()


def _broken_loader(kind: str):
    """A replacement for vllm_engine._load_chunk that breaks the push as `kind` says."""
    import torch

    from minigrpo.rollout import vllm_engine

    load = vllm_engine._load_chunk
    target = "model.layers.1.self_attn.k_proj.weight"

    def skip(worker, chunk):
        return load(worker, [(n, t) for n, t in chunk if n != target])

    def ulp(worker, chunk):
        def off(t):
            t = t.clone()
            t.view(-1)[0] = torch.nextafter(t.view(-1)[0], torch.tensor(float("inf"), dtype=t.dtype))
            return t

        return load(worker, [(n, off(t) if n == target else t) for n, t in chunk])

    def swap(worker, chunk):  # the layer's q and k (same shape in the tiny model) trade places
        other = {target: target.replace("k_proj", "q_proj"), target.replace("k_proj", "q_proj"): target}
        tensors = dict(chunk)
        return load(worker, [(n, tensors[other[n]] if n in other else t) for n, t in chunk])

    def transpose(worker, chunk):  # the layer's (square) q weight loaded transposed
        q = target.replace("k_proj", "q_proj")
        return load(worker, [(n, t.t().contiguous() if n == q else t) for n, t in chunk])

    return {"nothing": lambda worker, chunk: None, "skip": skip, "ulp": ulp, "swap": swap, "transpose": transpose}[kind]


def _nudge_one_ulp(policy) -> None:
    """One element of the policy's first weight, one ulp up, on this rank only."""
    import torch

    with torch.no_grad():
        p = next(policy.module.parameters())
        p.view(-1)[0] = torch.nextafter(p.view(-1)[0], torch.tensor(float("inf"), dtype=p.dtype))


def _shift_engine_logprobs(delta: float) -> None:
    """Every engine the trainer makes reports its log-probs `delta` higher (startup.make_engine wrapped)."""
    import dataclasses

    from minigrpo import startup

    make = startup.make_engine

    def make_engine(*a, **k):
        engine = make(*a, **k)
        generate = engine.generate

        def shifted(prompt_ids, sampling):
            batch = generate(prompt_ids, sampling)
            return dataclasses.replace(batch, logprobs=[[v + delta for v in row] for row in batch.logprobs])

        engine.generate = shifted
        return engine

    startup.make_engine = make_engine


def _record_sleep() -> None:
    """Engines made without sleep mode whose sleep/wake_up print an event instead (see --record-sleep)."""
    from minigrpo import startup

    make = startup.make_engine

    def make_engine(*a, sleep_mode=False, **k):
        engine = make(*a, **k)
        engine.sleep = lambda: _event(f"sleep {STEP}")
        engine.wake_up = lambda: _event(f"wake {STEP}")
        return engine

    startup.make_engine = make_engine


def _inject(nan_at: set[int], break_push_at: int | None, push_fault: str, diverge_at: int | None = None,
            break_rank: int | None = None, scale_at: tuple[int, float] = (-1, 1.0)) -> None:
    from minigrpo import ahead, phases, startup

    seed_of, loss_fn, score, push = ahead.rollout_seed, phases.grpo_loss, phases.score_completions, phases.sync_weights

    def rollout_seed(seed, step, *a, **k):
        global STEP
        if step != STEP:  # a step's first generation round
            STEP = step
            _event(f"step {step}")
        return seed_of(seed, step, *a, **k)

    def grpo_loss(*a, **k):
        loss, metrics = loss_fn(*a, **k)
        if STEP == scale_at[0]:
            loss = loss * scale_at[1]
        if STEP == OOM_AT:
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by faulty_run)")
        return (loss * float("nan") if STEP in nan_at else loss), metrics

    def score_completions(*a, **k):
        global STEP
        if k.get("trainer_state") is not None:  # the step being scored (async_generation draws ahead of it)
            STEP = k["trainer_state"].global_step // NUM_ITERATIONS + 1
        _event(f"reward {STEP} {time.time():.3f}")
        return score(*a, **k)

    def sync_weights(*a, **k):
        if diverge_at == STEP and int(os.environ.get("RANK", "0")) == 1:
            _nudge_one_ulp(a[1])  # (rollout, policy, probe_ids, atol): after the update, before the push
        rank = int(os.environ.get("RANK", "0"))
        if break_push_at is not None and STEP >= break_push_at and break_rank in (None, rank):
            from minigrpo.rollout import vllm_engine

            vllm_engine._load_chunk = _broken_loader(push_fault)  # the load "succeeds", wrongly
        _event(f"push {STEP}")
        return push(*a, **k)

    ahead.rollout_seed, phases.grpo_loss = rollout_seed, grpo_loss  # draw() looks it up in minigrpo.ahead
    phases.score_completions, phases.sync_weights = score_completions, sync_weights
    startup.sync_weights = sync_weights  # the push of a resumed checkpoint's weights ("push 0")


def main(argv: list[str]) -> None:
    global HANG_AT, OOM_AT, NUM_ITERATIONS
    eager_everywhere()
    from minigrpo import Config, train

    flags = dict(a[2:].partition("=")[::2] for a in argv if a.startswith("--"))
    model_dir, out_dir, *overrides = [a for a in argv if not a.startswith("--")]
    HANG_AT = int(flags.get("hang-at", HANG_AT))
    OOM_AT = int(flags.get("oom-at", OOM_AT))
    nan_at = {int(k) for k in flags["nan-at"].split(",")} if flags.get("nan-at") else set()
    break_at = int(flags["break-push-at"]) if "break-push-at" in flags else None
    diverge_at = int(flags["diverge-at"]) if "diverge-at" in flags else None
    if "record-sleep" in flags:
        _record_sleep()
    if "shift-engine-logprobs" in flags:
        _shift_engine_logprobs(float(flags["shift-engine-logprobs"]))
    break_rank = int(flags["break-push-rank"]) if "break-push-rank" in flags else None
    scale = flags.get("scale-loss-at", "-1:1").split(":")
    _inject(nan_at, break_at, flags.get("push-fault", "nothing"), diverge_at, break_rank, (int(scale[0]), float(scale[1])))
    rewards = [REWARDS[name] for name in flags.get("rewards", "says_a").split(",")]
    cfg = Config.load(None, TINY_DEFAULTS + [f"model={model_dir}", f"output_dir={out_dir}"] + overrides)
    NUM_ITERATIONS = cfg.num_iterations
    try:
        train(cfg, rewards, tiny_dataset(), tiny_dataset(16, seed=1), template=None, resume="resume" in flags)
    except Exception as e:
        _event(f"error {time.time():.3f} {type(e).__name__}: {e}")
        raise


if __name__ == "__main__":
    main(sys.argv[1:])
