"""The policy under DeepSpeed: the only file in minigrpo that imports deepspeed.

DeepSpeed does backward (with gradient averaging over ranks), gradient clipping, the optimizer
step at the accumulation boundary and the LR schedule. This file also gathers full weights under
ZeRO-3 (for the push to the rollout engine and for saving) and reads/writes DeepSpeed checkpoints.
Checked against DeepSpeed 0.19.8 on CPU (gloo) and its documented GPU behaviour.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from minigrpo import collectives, lora, quantize
from minigrpo.config import Config, ConfigError, Layout, load_deepspeed_config
from minigrpo.models import disable_dropout
from minigrpo.scoring import completion_logprobs


_TIMED_WORLD = None  # DeepSpeed's data-parallel group, made by init_distributed with our timeout
_FOREIGN_GROUP = ("DeepSpeed's data-parallel group is not the one init_distributed made (DeepSpeed was initialized "
                  "before minigrpo, or given an mpu or a mesh): its collectives would wait torch's default timeout "
                  "(30 min with gloo, 10 with NCCL), not dist_timeout_minutes")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int


def init_distributed(log_level: str = "warning", timeout_minutes: float = 60.0) -> DistInfo:
    """Join the process group (or make a one-process group); same code under torchrun/deepspeed.

    `deepspeed.initialize` needs RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; with
    any missing it tries MPI discovery and fails on mpi4py (0.19.8). A plain `python script.py`
    is one rank, so we fill them in. `log_level`: DeepSpeed's own messages below it are hidden.
    `timeout_minutes`: how long any collective waits (DeepSpeed's default is 10).
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if torch.cuda.is_available():
        # Before the group exists: NCCL (and broadcast_object_list) use the current device, and
        # without this every rank of a node would put its communicator on GPU 0.
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        # Explicit CPU accelerator: without it DeepSpeed guesses, with a warning per process.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(log_level.upper())  # DeepSpeed's one logger ("DeepSpeed"): config dumps, ZeRO notices
    if not torch.distributed.is_initialized():
        # One backend for the default group: NCCL on GPUs, gloo on CPUs. Our own small CPU tensors
        # (metric sums, votes) reach it only through minigrpo.collectives, which moves them.
        # DeepSpeed 0.19 on CPU prints (not logs) "... shm_comm_op built successfully" in here.
        quiet = contextlib.redirect_stdout(io.StringIO()) if log_level in ("warning", "error") else contextlib.nullcontext()
        with quiet:
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                       timeout=datetime.timedelta(minutes=timeout_minutes))
    # DeepSpeed 0.19.8 runs its data-parallel collectives (the gradient all-reduce, ZeRO-1/2's
    # reduce-scatters and gathers; ZeRO-3's parameter gathers use the default group) on a clone of
    # the world group that it makes with new_group(ranks), which gets torch's default timeout (30 min
    # with gloo, 10 with NCCL), not the one above: a rank frozen during a step stalled the others'
    # backward past dist_timeout_minutes (tests/test_rollout_server.py, the lost-trainer test,
    # 2026-12-07). So the clone is made here with our timeout, where DeepSpeed looks for it first
    # (`groups._WORLD_GROUP`, read by `_clone_world_group`); PolicyEngine checks that DeepSpeed used
    # it. Made once per process, like the default group: a later call's timeout changes neither.
    global _TIMED_WORLD
    from deepspeed.utils import groups

    if groups._WORLD_GROUP is None:
        groups._WORLD_GROUP = _TIMED_WORLD = collectives.world_group(datetime.timedelta(minutes=timeout_minutes))
    elif groups._WORLD_GROUP is not _TIMED_WORLD:  # before any model loads: minutes on a 3B model
        raise RuntimeError(_FOREIGN_GROUP)
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
    if cfg.dtype == "bfloat16" and ds["zero_optimization"].get("stage", 0) > 0:
        # Sum the micro-batches' gradients in fp32, not in bf16 (DeepSpeed's default: 8-16
        # micro-batches summed in bf16 lose ~3 bits). DeepSpeed 0.19.8 takes it at ZeRO-1/2/3 (at
        # ZeRO-1 by switching to its BF16 optimizer) and refuses it at ZeRO-0 (NotImplementedError):
        # a 16-bit run at ZeRO-0 with accumulation is warned about in PolicyEngine. fp16 (loss
        # scaling) is left as DeepSpeed has it: untested with fp32 accumulation. A file's own setting wins.
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    # DeepSpeed 0.19.8 accepts a client optimizer at ZeRO stage > 0 only if its type is exactly one
    # it knows (torch.optim.AdamW is); GuardedAdamW is AdamW plus a finite-gradient vote before
    # super().step(), so the update is AdamW's. Without this key every stage > 0 is refused.
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 10**9)  # our own logging
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(f"{cfg.deepspeed}: optimizer and scheduler come from the minigrpo config; remove them")
    return ds


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def lr_lambda(total_steps: int, warmup_ratio: float, kind: str):
    """Multiplier of the peak LR at optimizer step s: linear warmup, then cosine to 0 or constant."""
    warmup = warmup_steps(total_steps, warmup_ratio)

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

    DeepSpeed calls `step()` on the optimizer it was given (ZeRO-0 in fp32) or on the fp32 partitions
    it manages (ZeRO-1/2; but bf16 at ZeRO-1 runs DeepSpeed's BF16 optimizer). At ZeRO-3, in bf16 at
    ZeRO-0 and ZeRO-1, DeepSpeed's own optimizer finds non-finite gradients first and skips the step
    without calling this one: `PolicyEngine.step`
    reads that verdict too (`engine.was_step_applied()`) and counts the skip in `skipped`. Setting
    `overflow` is DeepSpeed's own signal (0.19.8, engine._take_model_step) to count the step as
    skipped and hold the LR schedule; under ZeRO-1/2 the ZeRO optimizer reports its own flag, so the
    schedule advances.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.overflow = False
        self.skipped = 0

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms = torch._foreach_norm(grads) if grads else []
        finite = float(all(torch.isfinite(n).item() for n in norms))
        self.overflow = collectives.all_reduce_scalars([finite], "min")[0] == 0.0  # every rank votes
        if self.overflow:
            self.skipped += 1
            return None
        return super().step(closure)


class PolicyEngine:
    """A Hugging Face causal LM wrapped by `deepspeed.initialize`."""

    def __init__(self, model: torch.nn.Module, cfg: Config, layout: Layout):
        import deepspeed

        self.cfg = cfg
        self.world_size = layout.world_size
        # Train mode, or transformers' gradient checkpointing does nothing (it checks `training`),
        # and no dropout, so every log-probability pass of the same weights gives the same numbers
        # (the loss compares them with the reference's and the engine's).
        disable_dropout(model)
        model.train()
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
        # DeepSpeed 0.19.8's attributes for the groups its gradient all-reduce and ZeRO use: any other
        # group than init_distributed's would wait torch's default timeout, not dist_timeout_minutes
        theirs = {self.engine.data_parallel_group, self.engine.seq_data_parallel_group}
        if _TIMED_WORLD is None or theirs != {_TIMED_WORLD}:  # e.g. a mesh from the DeepSpeed config
            raise RuntimeError(_FOREIGN_GROUP)
        self._last_skipped = False
        if cfg.dtype != "float32" and self.zero_stage == 0 and cfg.gradient_accumulation_steps > 1 \
                and collectives.rank() == 0:
            print(f"[minigrpo] warning: {cfg.dtype} at ZeRO-0 sums the {cfg.gradient_accumulation_steps} micro-batches' "
                  "gradients in 16 bits (DeepSpeed allows fp32 accumulation only at ZeRO-1/2/3); use a ZeRO-2 config "
                  "(recipes/deepspeed_zero2.json), which accumulates in fp32 and works on one GPU", file=sys.stderr, flush=True)
        self.adapted = lora.adapted_modules(model)  # LoRA: module paths with adapters; empty: full fine-tuning
        self.lora_scaling = cfg.lora_alpha / cfg.lora_rank if self.adapted else None

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def gathered(self, params):
        """A context in which `params` are whole on every rank (all ranks must enter it): under
        ZeRO-3 outside their module's forward they are partitioned (shape (0,)); DeepSpeed makes
        it a no-op for parameters that are not partitioned. For `scoring.head_logprobs`."""
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def backward(self, loss: torch.Tensor) -> None:
        """`loss`: this micro-batch's share of the step's loss, which is the sum of the shares of
        every micro-batch on every rank (`minigrpo.algo.normalize`). DeepSpeed divides each
        micro-batch's loss by gradient_accumulation_steps and averages gradients over the
        data-parallel ranks (at every ZeRO stage); multiplying by both here makes the step's
        gradient that of the sum."""
        self._new_backward()
        self.engine.backward(loss * (self.cfg.gradient_accumulation_steps * self.world_size))

    def _new_backward(self) -> None:
        """DeepSpeed 0.19.8 clears its ZeRO optimizer's "backward seen" flag at the start of
        `engine.forward`; minigrpo's forwards call the module's parts directly (base model, then the
        LM head: scoring.py), so the flag is cleared here, before each micro-batch's backward.
        Without it ZeRO-3 took a micro-batch's backward for a re-entry of the previous one and lost
        a micro-batch's gradient (global norm 11.3 instead of 42.0 with 2 micro-batches, tested)."""
        clear = getattr(self.engine.optimizer, "clear_backward_seen_flag", None)
        if clear is not None:
            clear()

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
        self._new_backward()
        self.engine.backward(torch.stack([p.sum() for p in params]).sum() * 0.0)

    def ghost_forward(self) -> None:
        """The no-grad scoring pass of a micro-batch without sequences (dynamic sampling left this
        rank fewer): nothing below ZeRO-3; at ZeRO-3, whose forwards gather parameters collectively,
        the same scoring path over a 3-token dummy, so every rank runs the same collectives."""
        if self.zero_stage == 3:
            with torch.no_grad():
                self._dummy_logprobs()

    def backward_ghost(self) -> None:
        """The backward of a micro-batch without sequences: an exact zero gradient, which keeps
        DeepSpeed's accumulation count and its per-micro-batch collectives. Below ZeRO-3 that is
        `backward_zero`; at ZeRO-3 a zero-weighted loss of the scoring path over a 3-token dummy
        (prompt pass, completion pass, LM head: the passes a real micro-batch runs)."""
        if self.zero_stage < 3:
            self.backward_zero()
            return
        self._new_backward()
        self.engine.backward(self._dummy_logprobs().sum() * 0.0)

    def _dummy_logprobs(self) -> torch.Tensor:
        return completion_logprobs(self.module, [[0]], [[0, 0]], gathered=self.gathered)  # [1, 2]

    def step(self) -> float | None:
        """Call after every micro-batch; at the accumulation boundary it clips, steps the
        optimizer and the schedule, and returns the global gradient norm before clipping."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary:
            self.optimizer.overflow = False  # set again only if DeepSpeed calls our step this time
        norm = None
        if boundary and self.engine.optimizer is self.optimizer:
            # DeepSpeed 0.19.8 steps our AdamW directly only at ZeRO-0 in fp32, and then clips with
            # torch's clip_grad_norm_ without keeping the norm; the module's gradients are the
            # step's, already averaged over ranks, so their norm is the global one. Every other
            # case has a DeepSpeed wrapper (ZeRO, or the bf16/fp16 optimizer that accumulates
            # into its own fp32 buffers and clears the module's bf16 gradients after each
            # micro-batch): it records the global norm of the step, read below.
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads).item() if grads else 0.0
        self.engine.step()
        if boundary:
            # Two ways a non-finite step is skipped: our GuardedAdamW finds it (ZeRO-0 in fp32, and
            # ZeRO-1/2, whose optimizer calls ours), or DeepSpeed's own optimizer does before ever
            # calling ours (ZeRO-3, and its bf16 optimizer at ZeRO-0 and -1; DeepSpeed 0.19.8). The engine's
            # `was_step_applied()` reports DeepSpeed's verdict (its optimizer's `overflow`, which at
            # ZeRO-0 fp32 is ours); either skip counts once.
            ds_skipped = not self.engine.was_step_applied()
            self._last_skipped = self.optimizer.overflow or ds_skipped
            if ds_skipped and not self.optimizer.overflow:
                self.optimizer.skipped += 1  # ours was never called: count it here
        if boundary and norm is None:
            norm = self.engine.get_global_grad_norm()
            norm = float(norm) if norm is not None else float("nan")
        return norm

    @property
    def last_step_skipped(self) -> bool:
        """True if the last optimizer step found non-finite gradients and changed nothing, whichever
        optimizer found them (see `step`)."""
        return self._last_skipped

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def full_weights(self, chunk_bytes: int = 256 * 2**20, select=None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) in Hugging Face naming, gathered under ZeRO-3 a chunk at a time, so
        at most one chunk of full weights exists besides the shards. Every rank must iterate it
        (the gather is collective); the tensors are detached copies. `select(name)`: only those
        parameters (the same on every rank). Q-LoRA's 4-bit weights come dequantized."""
        import deepspeed

        named = [(n, p) for n, p in self.module.named_parameters() if select is None or select(n)]
        if self.zero_stage < 3:
            yield from quantize.dequantized(named)  # detached; a 4-bit weight as the tensor it stands for
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

    def pushed_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """What the rollout engine samples from, in Hugging Face naming: `full_weights`, with LoRA
        merged into the base weights (W + s B A) and the adapter tensors left out. Collective under
        ZeRO-3, like `full_weights`."""
        if not self.adapted:
            return self.full_weights()
        return lora.merged(self.full_weights(), self.adapted, self.lora_scaling)

    def checksum_views(self) -> tuple[list[tuple[int, torch.Tensor]], list[tuple[int, torch.Tensor]]]:
        """What this rank holds of the weights, for the replica check (runtime.check_replicas):
        `(shards, replicas)`, lists of (parameter index, tensor). `shards` are this rank's parts of
        parameters whose parts differ between ranks (they add up over ranks to the whole model);
        `replicas` are whole parameters that every rank holds a copy of, which must be equal.

        ZeRO-0/1/2: every parameter is a replica. ZeRO-3: every parameter is a shard (its partition,
        `ds_tensor`, without the padding of the last rank's part), and the parameters DeepSpeed
        keeps whole on every rank (below stage3_param_persistence_threshold) are also replicas."""
        params = list(self.module.parameters())
        if self.zero_stage < 3:
            return [], [(i, p.detach()) for i, p in enumerate(params)]
        shards = []
        for i, p in enumerate(params):
            # DeepSpeed 0.19.8: rank r of the parameter's partition group holds elements
            # [r * part, (r + 1) * part) of the flattened parameter (ds_numel elements); the
            # last part is padded with elements that belong to nothing.
            part = p.ds_tensor.ds_numel
            valid = max(0, min(part, p.ds_numel - collectives.rank(p.ds_process_group) * part))
            shards.append((i, p.ds_tensor.detach().reshape(-1)[:valid]))
        replicas = [(i, p.detach()) for i, p in enumerate(params) if p.numel() == p.ds_numel]  # kept whole
        return shards, replicas

    def save_checkpoint(self, path: str, client_state: dict) -> None:
        # With LoRA the frozen base weights are not saved: the run reloads them from its model.
        self.engine.save_checkpoint(path, tag="deepspeed", client_state=client_state,
                                    exclude_frozen_parameters=bool(self.adapted))

    def load_checkpoint(self, path: str) -> dict:
        """Restores weights, optimizer, scheduler; returns the client state saved with them."""
        # LoRA: the checkpoint holds the adapters only; the base weights are already loaded, hence
        # not strict (DeepSpeed 0.19.8 passes it to the module's load_state_dict).
        _, client = self.engine.load_checkpoint(path, tag="deepspeed", load_module_strict=not self.adapted)
        if client is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {path}")
        return client
