"""Every collective minigrpo itself calls goes through this file (DeepSpeed's and vLLM's own stay theirs).

Why one file: NCCL takes only CUDA tensors and gloo only CPU ones, and the loop's bookkeeping
(metric sums, votes, the signal flag) is naturally made of small CPU tensors. A CPU-tested loop
that calls `dist.all_reduce(cpu_tensor)` directly works under gloo and crashes at step 1 under
NCCL. Here each tensor is moved to the device the group's backend needs and the result comes
back on the caller's device, so a caller cannot get it wrong. `tests/test_collectives.py` fails
if any other minigrpo file calls torch.distributed's collectives, statically and at run time.

Without a process group (a plain one-process run) every function is the identity.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


def active() -> bool:
    """True when there is a process group with more than one rank."""
    return dist.is_initialized() and dist.get_world_size() > 1


def rank(group=None) -> int:
    """This process's rank in `group` (the default group if None); 0 without a process group."""
    return dist.get_rank(group) if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def backend_device(group=None) -> torch.device:
    """The device a tensor must be on for `group`'s backend (the default group if None)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A new tensor: `t` reduced over all ranks (op: sum | min | max), on `t`'s device."""
    if not active():
        return t.clone()
    return _all_reduce_on_backend(t, op)


def _all_reduce_on_backend(t: torch.Tensor, op: str) -> torch.Tensor:
    """The reduction itself: `t` moved to the backend's device, reduced, moved back. Apart from
    `all_reduce` so that a one-rank NCCL group (one GPU) can run the move (tests/test_gpu.py)."""
    work = t.detach().to(backend_device(), copy=True)
    dist.all_reduce(work, op=_OPS[op])
    return work.to(t.device)


def all_reduce_scalars(values: list[float], op: str = "sum", dtype=torch.float64) -> list[float]:
    """A list of numbers reduced elementwise over ranks (one collective for all of them)."""
    return all_reduce(torch.tensor(values, dtype=dtype), op).tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (pickled; small objects only)."""
    if not active():
        return obj
    box = [obj]
    # torch puts the pickled bytes on torch.cuda.current_device() under NCCL, which the trainer
    # sets to the rank's own GPU before the group is made (engine.init_distributed).
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def world_group(timeout: datetime.timedelta):
    """A new group of every rank whose collectives wait at most `timeout`. `dist.new_group` without
    a timeout gives torch's default (30 minutes with gloo, 10 with NCCL), not the default group's.
    Every rank must call it, in the same order as the other groups it makes."""
    return dist.new_group(ranks=list(range(dist.get_world_size())), timeout=timeout)


# ---------------------------------------------------------------------- a two-process side group
# The rollout server's weight channel is its own process group (trainer rank 0 and the server),
# not the trainer's default group; these functions serve it.


def pair_backend() -> str:
    """The two-process group's backend on this side: both sides must agree (server_engine checks it)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def pair_group(store: dist.Store, rank: int, timeout: float):
    """The two-process group (trainer rank 0 = 0, the rollout server = 1) over `store`, built
    directly: the trainer's default group already exists, so not `init_process_group`. Both sides
    call this: NCCL between GPUs, gloo between CPU processes."""
    delta = datetime.timedelta(seconds=timeout)
    if pair_backend() == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = delta
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    return dist.ProcessGroupGloo(store, rank, 2, delta)


def broadcast_in(group, buffer: torch.Tensor, src: int, timeout: float, what: str, stop=None) -> None:
    """Broadcast `buffer` (already on the group's device) within `group`, and wait for it with a
    real deadline: a NCCL `Work.wait()` returns once the operation is queued on the GPU stream,
    not when it is done, so a peer that died would hang the next GPU op instead of raising here.
    Polling `is_completed()` works for both backends. Raises TimeoutError after `timeout` s.

    The backend gets a longer timeout than ours: with the same one, gloo's own 2000 ms timer and
    our poll race, and gloo can win with a RuntimeError (seen once in CI), so the caller would get
    the backend's message instead of the TimeoutError that names what did not arrive.
    `stop()` True: the peer is known to have failed (its HTTP answer said so); stop waiting."""
    work = group.broadcast(buffer, src, datetime.timedelta(seconds=timeout + max(10.0, timeout)))
    wait_for(work, timeout, what, stop)


def wait_for(work, timeout: float, what: str, stop=None) -> None:
    deadline = time.monotonic() + timeout
    pause = 1e-4
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not complete within {timeout:.0f} s")
        if stop is not None and stop():
            raise RuntimeError(f"{what} was abandoned: the other side failed")
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    work.wait()  # surfaces an error the backend recorded (gloo: a peer that closed its end)


def raise_if_any(error: BaseException | None, kind: type[BaseException] = RuntimeError, what: str = "a check") -> None:
    """Every rank learns whether any rank failed (one all_reduce of one number): the rank that failed
    raises its `error`, the others `kind` saying `what` failed on another rank, so no rank is left
    waiting in a later collective for one that stopped. Every rank must call it."""
    failed = all_reduce_scalars([float(error is not None)], "max")[0]
    if error is not None:
        raise error
    if failed:
        raise kind(f"{what} failed on another rank (its error names the cause); stopping rank {rank()} too")

