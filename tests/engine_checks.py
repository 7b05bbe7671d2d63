"""Checks of the DeepSpeed-wrapped policy (minigrpo.engine.PolicyEngine) that need a process of their
own (DeepSpeed keeps a process group and global state), run by tests/test_engine.py.

    python tests/engine_checks.py gradnorm MODEL_DIR STAGE DTYPE   # the logged grad norm is DeepSpeed's
    python tests/engine_checks.py trainmode MODEL_DIR              # checkpointing recomputes, dropout is off
    python tests/engine_checks.py stepgrad MODEL_DIR LOSS_TYPE GAS OUT   # the step's gradient, to OUT (rank 0)
    python tests/engine_checks.py accum MODEL_DIR ACCUM_DTYPE        # bf16 ZeRO-2: the summed gradient vs an fp32 sum
    python tests/engine_checks.py alloc MODEL_DIR STAGE DTYPE        # bytes held by weights, gradients, optimizer
    python tests/engine_checks.py dptimeout MODEL_DIR STAGE MARKER   # 2 ranks: DeepSpeed's group has our timeout
    python tests/engine_checks.py foreigngroup MODEL_DIR             # a DeepSpeed group made before ours: refused

Each prints one line `RESULT {json}` (rank 0's, with several ranks).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [[5, 6, 7], [5, 6, 7]]
COMPLETIONS = [[8, 9, 10, 4], [11, 12]]
WEIGHTS = torch.tensor([[1.0, -2.0, 0.5, 1.5], [0.3, 0.7, 0.0, 0.0]])  # a loss that touches every token


def _policy(model_dir: str, stage: str = "0", dtype: str = "float32", deepspeed: str | None = None,
            timeout_minutes: float = 60.0, **overrides):
    from minigrpo import Config
    from minigrpo.engine import PolicyEngine, init_distributed
    from minigrpo.models import load_causal_lm

    info = init_distributed(timeout_minutes=timeout_minutes)
    batch = {"prompts_per_step": 1, "num_generations": 2, "gradient_accumulation_steps": 2}
    cfg = Config(model=model_dir, max_steps=1, dtype=dtype,
                 deepspeed=deepspeed or (None if stage == "0" else str(ROOT / "recipes" / f"deepspeed_zero{stage}.json")),
                 learning_rate=1e-3, warmup_ratio=0.0, lr_scheduler_type="constant", **{**batch, **overrides})
    model = load_causal_lm(model_dir, dtype)
    return model, lambda m: PolicyEngine(m, cfg, cfg.layout(info.world_size))


def gradnorm(model_dir: str, stage: str, dtype: str) -> dict:
    """Two micro-batches, one optimizer step: the norm PolicyEngine.step returns, DeepSpeed's own
    global norm of the step, and the norm of the module's gradients at the boundary."""
    from minigrpo.scoring import completion_logprobs

    model, wrap = _policy(model_dir, stage, dtype)
    policy = wrap(model)
    for k in range(2):
        lp = completion_logprobs(policy.module, PROMPTS[k:k + 1], COMPLETIONS[k:k + 1], 0.9, gathered=policy.gathered)
        policy.backward((lp * WEIGHTS[k:k + 1, : lp.shape[1]].to(lp.device)).sum())
        if k == 1:
            grads = [p.grad.float() for p in policy.module.parameters() if p.grad is not None]
            module_norm = torch.nn.utils.get_total_norm(grads).item() if grads else 0.0
        logged = policy.step()
    ds = policy.engine.get_global_grad_norm()
    return {"logged": logged, "deepspeed": None if ds is None else float(ds), "module_at_boundary": module_norm,
            "optimizer": type(policy.engine.optimizer).__name__}


def trainmode(model_dir: str) -> dict:
    """A model whose attention has dropout 0.5, wrapped with gradient checkpointing on: the policy
    is in train mode, checkpointed layers run again in backward, and the log-probs are the same
    in every pass (dropout off) and equal to an eval-mode copy's."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from minigrpo.models import load_causal_lm
    from minigrpo.scoring import completion_logprobs

    model, wrap = _policy(model_dir, gradient_checkpointing=True)
    reference = load_causal_lm(model_dir).eval()
    for m in (model, reference):
        for module in m.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.5

    control = load_causal_lm(model_dir).train()  # the same dropout, not disabled: passes differ
    for module in control.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    with torch.no_grad():
        noisy = [completion_logprobs(control, PROMPTS, COMPLETIONS) for _ in range(2)]

    policy = wrap(model)
    reference.to(next(policy.module.parameters()).device)  # DeepSpeed put the policy on the GPU, if any
    layer0 = next(m for m in policy.module.modules() if isinstance(m, GradientCheckpointingLayer))
    calls = []
    layer0.register_forward_pre_hook(lambda *_: calls.append(1))
    lp = completion_logprobs(policy.module, PROMPTS, COMPLETIONS, gathered=policy.gathered)
    forward_calls = len(calls)
    policy.backward((lp * WEIGHTS.to(lp.device)).sum())
    backward_calls = len(calls) - forward_calls
    with torch.no_grad():
        again = completion_logprobs(policy.module, PROMPTS, COMPLETIONS, gathered=policy.gathered)
        plain = completion_logprobs(reference, PROMPTS, COMPLETIONS)
    return {
        "training": policy.module.training,
        "layer0_calls_forward": forward_calls,
        "layer0_calls_backward": backward_calls,
        "control_passes_differ": (noisy[0] - noisy[1]).abs().max().item() > 0,
        "max_diff_between_passes": (lp.detach() - again).abs().max().item(),
        "max_diff_to_eval_copy": (again - plain).abs().max().item(),
    }


# One step of 8 completions (2 prompts x 4), ragged lengths 1..6, fixed advantages
STEP_PROMPTS = [[5, 6, 7]] * 4 + [[9, 10]] * 4
STEP_COMPLETIONS = [[8, 9, 10, 4], [11, 12], [13], [14, 15, 16, 17, 18, 19], [20, 21, 22], [23, 24], [25, 26, 27, 28, 29], [30]]
STEP_ADVANTAGES = [1.0, -0.5, 0.25, -1.5, 0.75, 2.0, -1.0, 0.5]


def stepgrad(model_dir: str, loss_type: str, gas: str, out: str) -> dict:
    """The gradient of one GRPO step over STEP_* (beta 0.04, KL to the initial policy shifted by
    0.1), cut into `gas` micro-batches per rank over however many ranks run this; rank 0 saves the
    gradient at the accumulation boundary (after DeepSpeed's reduction) to `out`. The same step cut
    any way must give the same gradient: the step-level token weights (minigrpo.algo.normalize) and
    PolicyEngine.backward's undoing of DeepSpeed's averages."""
    from minigrpo import collectives
    from minigrpo.algo import grpo_loss, token_weights
    from minigrpo.scoring import completion_logprobs

    model, wrap = _policy(model_dir, prompts_per_step=2, num_generations=4, gradient_accumulation_steps=int(gas))
    policy = wrap(model)
    rank, world = collectives.rank(), collectives.world_size()
    n = len(STEP_COMPLETIONS) // world
    mine = slice(rank * n, (rank + 1) * n)
    prompts, completions = STEP_PROMPTS[mine], STEP_COMPLETIONS[mine]
    advantages = torch.tensor(STEP_ADVANTAGES[mine])
    seqs, tokens = collectives.all_reduce_scalars([len(completions), sum(map(len, completions))])
    micro = n // int(gas)
    for k in range(0, n, micro):
        c = completions[k:k + micro]
        with torch.no_grad():
            ref = completion_logprobs(policy.module, prompts[k:k + micro], c) - 0.1
        lp = completion_logprobs(policy.module, prompts[k:k + micro], c)  # [m, T]
        mask = (torch.arange(lp.shape[1])[None, :] < torch.tensor([len(x) for x in c])[:, None]).float()
        loss, _ = grpo_loss(lp, None, ref, advantages[k:k + micro], mask, beta=0.04, loss_type=loss_type,
                            max_completion_length=6, weights=token_weights(mask, loss_type, 6, seqs, tokens))
        policy.backward(loss)
        if k + micro >= n:
            grad = torch.cat([p.grad.flatten().float() for p in policy.module.parameters()])
        policy.step()
    if rank == 0:
        torch.save(grad, out)
    return {"grad_norm": grad.norm().item()}


def accum(model_dir: str, accum_dtype: str) -> dict:
    """bf16 weights at ZeRO-2, one step of 8 micro-batches (one completion each): the summed gradient
    that reaches our optimizer (captured in GuardedAdamW.step, before it steps) against the fp32 sum
    of the very same bf16 micro-batch gradients, made with plain autograd on a bf16 copy of the
    model. `accum_dtype`: "default" (minigrpo's DeepSpeed config: fp32) or "bf16" (forced by a
    DeepSpeed file, DeepSpeed's own default). Returns the relative L2 error of the sum."""
    import copy
    import tempfile

    from minigrpo.engine import GuardedAdamW
    from minigrpo.scoring import completion_logprobs

    ds = None
    if accum_dtype == "bf16":
        config = json.loads((ROOT / "recipes" / "deepspeed_zero2.json").read_text())
        ds = str(Path(tempfile.mkdtemp()) / "zero2_bf16_accum.json")
        Path(ds).write_text(json.dumps({**config, "data_types": {"grad_accum_dtype": "bf16"}}))
    n = len(STEP_COMPLETIONS)
    model, wrap = _policy(model_dir, "2", "bfloat16", deepspeed=ds, prompts_per_step=1, num_generations=n,
                          gradient_accumulation_steps=n, max_grad_norm=1e9)  # no clipping: the sum itself
    plain = copy.deepcopy(model)  # the same bf16 weights, outside DeepSpeed
    captured = {}
    step = GuardedAdamW.step

    def capture(self, closure=None):
        captured["grad"] = torch.cat([p.grad.flatten().float() for g in self.param_groups for p in g["params"]])
        return step(self, closure)

    GuardedAdamW.step = capture
    policy = wrap(model)
    plain.to(next(policy.module.parameters()).device)  # DeepSpeed moved the policy to its device (a GPU)

    def loss_of(module, k):
        lp = completion_logprobs(module, STEP_PROMPTS[k:k + 1], STEP_COMPLETIONS[k:k + 1])  # [1, T]
        return (lp.float() * STEP_ADVANTAGES[k]).sum() / 37.0  # a share of the step's loss

    reference = None
    for k in range(n):
        policy.backward(loss_of(policy.module, k))
        policy.step()
        plain.zero_grad()
        loss_of(plain, k).backward()  # each micro-batch's bf16 gradient, summed in fp32
        g = torch.cat([p.grad.flatten().float() for p in plain.parameters() if p.requires_grad])
        reference = g if reference is None else reference + g
    got = captured["grad"][: reference.numel()]  # the flat partition, padding dropped
    return {"relative_error": ((got - reference).norm() / reference.norm()).item(), "numel": reference.numel(),
            "accum_dtype": str(policy.engine.get_data_types()[1])}


def alloc(model_dir: str, stage: str, dtype: str) -> dict:
    """After one optimizer step: the bytes of the module's weights and gradients and of the optimizer's
    tensors (fp32 master partitions and AdamW states), as minigrpo.plan counts them."""
    from minigrpo.scoring import completion_logprobs

    model, wrap = _policy(model_dir, stage, dtype, gradient_accumulation_steps=1, num_generations=2)
    policy = wrap(model)
    lp = completion_logprobs(policy.module, PROMPTS, COMPLETIONS, gathered=policy.gathered)
    policy.backward((lp * WEIGHTS[:, : lp.shape[1]]).sum())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in policy.module.parameters() if p.grad is not None)
    policy.step()

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    opt = policy.engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # DeepSpeed's ZeRO optimizer wraps ours
    adam = nbytes(v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    master = nbytes(getattr(opt, "single_partition_of_fp32_groups", []))
    return {"weights": nbytes(policy.module.parameters()), "module_gradients": grads, "adam": adam,
            "fp32_master": master, "parameters": sum(p.numel() for p in policy.module.parameters())}


def dptimeout(model_dir: str, stage: str, marker: str) -> None:
    """2 ranks, dist_timeout_minutes 0.25 (15 s: the set-up's collectives, under 3 pytest workers on
    2 cores, must meet within it too): rank 1 stops taking part after DeepSpeed's set-up (it waits for
    `marker`, at most 120 s); rank 0's step reaches DeepSpeed's gradient all-reduce (ZeRO-0) or
    reduce-scatter (ZeRO-2), on DeepSpeed's data-parallel group. Rank 0: how long until it raised."""
    import os
    import time

    from minigrpo.scoring import completion_logprobs

    model, wrap = _policy(model_dir, stage, timeout_minutes=0.25, prompts_per_step=2)  # a group per rank
    policy = wrap(model)
    if torch.distributed.get_rank() == 1:
        deadline = time.monotonic() + 120
        while not Path(marker).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        os._exit(0)  # no collective, no clean-up: the group is broken on purpose
    start, error = time.monotonic(), None
    try:
        for k in range(2):
            lp = completion_logprobs(policy.module, PROMPTS[k:k + 1], COMPLETIONS[k:k + 1], 0.9, gathered=policy.gathered)
            policy.backward((lp * WEIGHTS[k:k + 1, : lp.shape[1]].to(lp.device)).sum())
            policy.step()
    except RuntimeError as e:  # gloo; NCCL's watchdog may abort the process instead, naming the timeout
        error = str(e)
    seconds = time.monotonic() - start
    Path(marker).write_text("done")
    sys.stdout.write(f"RESULT {json.dumps({'seconds': seconds, 'error': error})}\n")
    sys.stdout.flush()
    os._exit(0)


def foreigngroup(model_dir: str) -> dict:
    """A DeepSpeed world group that is not init_distributed's (made as DeepSpeed makes it, with
    torch's default timeout): made before init_distributed, init_distributed refuses it (before any
    model loads); put in after it, PolicyEngine finds DeepSpeed on it and refuses to train."""
    import datetime

    from deepspeed.utils import groups

    from minigrpo import engine

    engine.init_distributed()  # one rank's default group, and our world group
    ours = groups._WORLD_GROUP
    errors = {}
    groups._WORLD_GROUP = torch.distributed.new_group(ranks=[0], timeout=datetime.timedelta(minutes=30))
    try:
        engine.init_distributed()
    except RuntimeError as e:
        errors["init"] = str(e)
    groups._WORLD_GROUP = ours
    model, wrap = _policy(model_dir)  # init_distributed with ours in place: accepted
    groups._WORLD_GROUP = torch.distributed.new_group(ranks=[0], timeout=datetime.timedelta(minutes=30))
    try:
        wrap(model)  # DeepSpeed's initialize takes the foreign group
    except RuntimeError as e:
        errors["engine"] = str(e)
    return errors


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    result = {"gradnorm": gradnorm, "trainmode": trainmode, "stepgrad": stepgrad, "accum": accum,
              "alloc": alloc, "dptimeout": dptimeout, "foreigngroup": foreigngroup}[mode](*args)
    # rank 0's only, in one write: two ranks' "RESULT" lines once ran together on torchrun's shared stdout
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        sys.stdout.write(f"RESULT {json.dumps(result)}\n")
        sys.stdout.flush()
