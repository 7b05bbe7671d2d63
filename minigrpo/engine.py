"""The policy under DeepSpeed: the only file in minigrpo that imports deepspeed.

DeepSpeed does backward (with gradient averaging over ranks), gradient clipping, the optimizer
step at the accumulation boundary and the LR schedule. This file also gathers full weights under
ZeRO-3 (for the push to the rollout engine and for saving) and reads/writes DeepSpeed checkpoints.
Checked against DeepSpeed 0.19.8 on CPU (gloo) and its documented GPU behaviour.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from minigrpo.config import Config, ConfigError, Layout, load_deepspeed_config


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int


def init_distributed() -> DistInfo:
    """Join the process group (or make a one-process group); same code under torchrun/deepspeed.

    `deepspeed.initialize` needs RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; with
    any missing it tries MPI discovery and fails on mpi4py (0.19.8). A plain `python script.py`
    is one rank, so we fill them in.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.cuda.is_available():
        # Explicit CPU accelerator: without it DeepSpeed guesses, with a warning per process.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(
        torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    )


def _free_port() -> int:
    """A port nobody listens on now (one process: nobody else needs to agree on it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepspeed_config(cfg: Config, layout: Layout) -> dict:
    """The user's DeepSpeed file (ZeRO stage, offload, ...) completed with the numbers that the
    minigrpo config owns. A file that sets one of those to a different value is an error: two
    sources of truth for the batch size is how reproductions silently break."""
    ds = dict(load_deepspeed_config(cfg.deepspeed))
    owned = {
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": layout.micro_batch * cfg.gradient_accumulation_steps * layout.world_size,
        "gradient_clipping": cfg.max_grad_norm,
    }
    for key, value in owned.items():
        if key in ds and ds[key] not in ("auto", value):
            raise ConfigError(f"{cfg.deepspeed}: {key}={ds[key]} disagrees with the minigrpo config ({value})")
        ds[key] = value
    for key, on in (("bf16", cfg.dtype == "bfloat16"), ("fp16", cfg.dtype == "float16")):
        ds[key] = {**ds.get(key, {}), "enabled": on}
    ds.setdefault("zero_optimization", {"stage": 0})
    ds.setdefault("steps_per_print", 10**9)  # our own logging
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(f"{cfg.deepspeed}: optimizer and scheduler come from the minigrpo config; remove them")
    return ds


def lr_lambda(total_steps: int, warmup_ratio: float, kind: str):
    """Multiplier of the peak LR at optimizer step s: linear warmup, then cosine to 0 or constant."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return f


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips any step whose gradients hold NaN or inf on any rank: no weight changes.

    DeepSpeed calls `step()` on the optimizer it was given (ZeRO-0) or on the fp32 partitions it
    manages (ZeRO-1/2/3), so checking here covers every stage. Setting `overflow` is DeepSpeed's
    own signal (0.19.8, engine._take_model_step) to count the step as skipped and hold the LR
    schedule; under ZeRO-1/2/3 the ZeRO optimizer reports its own flag, so the schedule advances.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.overflow = False
        self.skipped = 0

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms = torch._foreach_norm(grads) if grads else []
        finite = torch.tensor(float(all(torch.isfinite(n).item() for n in norms)))
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        self.overflow = finite.item() == 0.0
        if self.overflow:
            self.skipped += 1
            return None
        return super().step(closure)


class PolicyEngine:
    """A Hugging Face causal LM wrapped by `deepspeed.initialize`."""

    def __init__(self, model: torch.nn.Module, cfg: Config, layout: Layout):
        import deepspeed

        self.cfg = cfg
        if cfg.gradient_checkpointing:
            # Before initialize: DeepSpeed wraps the module and the flag must already be set.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in model.parameters() if p.requires_grad]
        # Client AdamW rather than a DeepSpeed "optimizer" entry: it needs no compiled op (a DS
        # FusedAdam build takes ~3 min on CPU) and fused=True made its step ~5x faster on CPU.
        self.optimizer = optimizer = GuardedAdamW(
            params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.weight_decay, fused=True,
        )
        total = cfg.max_steps * cfg.num_iterations
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(total, cfg.warmup_ratio, cfg.lr_scheduler_type)
        )
        self.ds_config = deepspeed_config(cfg, layout)
        # DeepSpeed steps the scheduler itself, once per optimizer step at the accumulation boundary.
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self.zero_stage = self.engine.zero_optimization_stage()

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides the loss by gradient_accumulation_steps here, so each micro-batch
        # passes its own mean loss and the step gets the mean over micro-batches.
        self.engine.backward(loss)

    @property
    def can_skip_backward(self) -> bool:
        """ZeRO-3 keeps parameters partitioned outside a module's forward, so `backward_zero` has
        no full parameters to attach a zero loss to there."""
        return self.zero_stage < 3

    def backward_zero(self) -> None:
        """A micro-batch whose loss is known to be exactly 0 (every advantage 0, beta 0): a backward
        of `0 * sum(parameters)` instead of the model. It adds an exact 0 to every gradient, so
        DeepSpeed's accumulation count, its gradient hooks and their collectives (one per rank per
        micro-batch) run as for a real micro-batch, and AdamW sees the same gradients (and so the
        same momentum update) as if the micro-batch had been run. Costs ~1 elementwise pass over
        the parameters instead of a forward and backward over the sequences."""
        if not self.can_skip_backward:
            raise RuntimeError("backward_zero needs ZeRO stage < 3")
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.engine.backward(torch.stack([p.sum() for p in params]).sum() * 0.0)

    def step(self) -> float | None:
        """Call after every micro-batch; at the accumulation boundary it clips, steps the
        optimizer and the schedule, and returns the global gradient norm before clipping."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        norm = None
        if boundary and self.zero_stage == 0:
            # ZeRO-0 clips without keeping the norm; gradients are already averaged over ranks
            # at the boundary, so the local total norm is the global one.
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads).item() if grads else 0.0
        self.engine.step()
        if boundary and norm is None:
            norm = self.engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
        return norm

    @property
    def last_step_skipped(self) -> bool:
        """True if the last optimizer step found non-finite gradients and changed nothing."""
        return self.optimizer.overflow

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def full_weights(self, chunk_bytes: int = 256 * 2**20) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) in Hugging Face naming, gathered under ZeRO-3 a chunk at a time, so
        at most one chunk of full weights exists besides the shards. Every rank must iterate it
        (the gather is collective); the tensors are detached copies."""
        import deepspeed

        named = list(self.module.named_parameters())
        if self.zero_stage < 3:
            for name, p in named:
                yield name, p.detach()
            return
        chunk: list[tuple[str, torch.nn.Parameter]] = []
        size = 0
        for i, (name, p) in enumerate(named):
            chunk.append((name, p))
            size += p.ds_numel * p.element_size()  # ds_numel: the full size; p.numel() is 0 here
            if size >= chunk_bytes or i == len(named) - 1:
                # Every rank enters the context (or it hangs); outside it the parameters have
                # shape (0,), so copy inside.
                with deepspeed.zero.GatheredParameters([q for _, q in chunk], modifier_rank=None):
                    copies = [(n, q.detach().clone()) for n, q in chunk]
                yield from copies
                chunk, size = [], 0

    def save_checkpoint(self, path: str, client_state: dict) -> None:
        self.engine.save_checkpoint(path, tag="deepspeed", client_state=client_state)

    def load_checkpoint(self, path: str) -> dict:
        """Restores weights, optimizer, scheduler; returns the client state saved with them."""
        _, client = self.engine.load_checkpoint(path, tag="deepspeed")
        if client is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {path}")
        return client
