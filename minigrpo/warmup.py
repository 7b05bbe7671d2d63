"""A supervised warm-up before GRPO (the "cold start" DeepSeek-R1 begins with; R1-Zero has none).

A small model that never writes a correct Countdown answer gives GRPO no reward spread to learn
from (issue 13: SmolLM2-135M, 0 successes in thousands of samples). The generator builds each task
from a random expression, so it knows one answer; a few dozen steps of ordinary fine-tuning on
completions written from those answers teach the format and the habit of combining the given
numbers, and GRPO starts from there. It is a separate, optional stage with its own recipe
(`recipes/countdown_cpu_warmup.yaml`, run by `examples/countdown_warmup.py`), and a GRPO gain is
measured from its checkpoint, never from the base model.

Data: the train split of the GRPO recipe's own data (the same generator tier, size, seed and
split), so the GRPO run's held-out tasks are never seen here. A completion continues the R1
prompt (which ends in `<think>`) with the construction steps, the answer and the end-of-sequence
token, so the model learns to end its answer itself:

     7 + 10 = 17, 17 + 4 = 21.</think>
    <answer>(7 + 10) + 4 = 21</answer><|im_end|>

Training: one process on one device (a GPU when there is one), plain AdamW at a constant rate on
float32 weights (with a bf16 recipe: bf16 autocast on CUDA, and the model saved in bf16; pure bf16
weights would round most AdamW updates of this size away), dropout off, the
chunked log-prob pass of GRPO's scoring (`scoring.completion_logprobs`), the loss of
`algo.sft_loss`. Not DeepSpeed: a warm-up of a few dozen steps of a model that fits one device
needs none of ZeRO, and keeping DeepSpeed in `engine.py` alone keeps this file small. A model too
large for one device in float32 with AdamW (16 bytes a parameter) needs another warm-up tool.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import yaml

from minigrpo.algo import sft_loss
from minigrpo.config import Config, ConfigError, with_overrides
from minigrpo.data import R1_COUNTDOWN, load_recipe_tasks
from minigrpo.data.countdown import GENERATOR_NAMES
from minigrpo.data.prompts import render_prompt, tokenize_prompts
from minigrpo.models import disable_dropout, load_causal_lm, load_tokenizer, resolve_model, set_transformers_log_level
from minigrpo.scoring import completion_logprobs


@dataclass
class WarmupConfig:
    """The warm-up's settings; the model, dtype, data and prompt come from the GRPO recipe `recipe`."""

    recipe: str  # the GRPO recipe this warm-up prepares for (its model, dtype, data tier and split)
    output_dir: str = "outputs/countdown-warmup"  # the model is written to <output_dir>/model
    steps: int = 40
    batch_size: int = 8  # tasks per step
    learning_rate: float = 5e-5
    max_grad_norm: float = 1.0
    seed: int = 0  # the order of the training tasks
    logging_steps: int = 5

    def __post_init__(self):
        for key in ("steps", "batch_size", "logging_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}: must be an integer >= 1, got {value!r}")
        for key in ("learning_rate", "max_grad_norm"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{key}: must be a finite number > 0, got {value!r}")
        if not Path(self.recipe).is_file():
            raise ConfigError(f"recipe: {self.recipe} is not a file")

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> WarmupConfig:
        """From a YAML file plus `key=value` overrides (YAML values); a relative `recipe` is read
        from the warm-up file's folder. Unknown keys are refused."""
        values = yaml.safe_load(Path(path).read_text()) or {}
        if "recipe" in values and not Path(str(values["recipe"])).is_absolute():
            values["recipe"] = str(Path(path).parent / str(values["recipe"]))
        values = with_overrides(values, overrides)  # a recipe= given here is relative to the working directory
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown warm-up keys {unknown}")
        if "recipe" not in values:
            raise ConfigError("recipe: missing (the GRPO recipe this warm-up prepares for)")
        return cls(**values)


def solution_completion(steps: list[str], equation: str, target: int) -> str:
    """The text a warm-up completion holds after the prompt's `<think>` (the EOS token follows)."""
    return f" {', '.join(steps)}.</think>\n<answer>{equation} = {target}</answer>"


def warmup(wcfg: WarmupConfig) -> Path:
    """Fine-tune the recipe's model on `steps` x `batch_size` known solutions and write it as a
    Hugging Face folder, `<output_dir>/model` (with its tokenizer), plus `warmup_metrics.jsonl`.
    Returns the model folder, which a GRPO recipe takes as `model`."""
    cfg = Config.load(wcfg.recipe)  # every setting checked before the model loads
    if str(cfg.dataset) not in GENERATOR_NAMES:
        raise ConfigError(f"the warm-up needs the recipe's dataset to be the generator (known answers), got {cfg.dataset!r}")
    set_transformers_log_level(cfg.log_level)
    random.seed(wcfg.seed)
    np.random.seed(wcfg.seed)
    torch.manual_seed(wcfg.seed)
    out = Path(wcfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    train = load_recipe_tasks(cfg, solutions=True)["train"]  # never a task of the recipe's held-out set
    total = wcfg.steps * wcfg.batch_size
    order = np.random.default_rng(wcfg.seed).permutation(len(train))  # one epoch, or more if asked
    rows = [train[int(order[i % len(train)])] for i in range(total)]

    path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{path}'s tokenizer has no EOS token: a warm-up completion must end with one")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_causal_lm(path, torch.float32, cfg.trust_remote_code).to(device)  # float32 master weights
    disable_dropout(model)  # as the GRPO policy: the shared-prompt pass runs the prompt in eval mode
    model.train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    low = getattr(torch, cfg.dtype)
    # bf16 autocast on CUDA (no loss scaling needed); float16 would need a GradScaler: computed in float32
    autocast = torch.autocast("cuda", dtype=low) if device.type == "cuda" and low == torch.bfloat16 \
        else contextlib.nullcontext()
    prompts = tokenize_prompts(tokenizer, [render_prompt(tokenizer, r, R1_COUNTDOWN) for r in rows],
                               cfg.max_prompt_length)
    completions = [tokenizer(solution_completion(r["steps"], r["equation"], r["target"]),
                             add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in rows]
    longest = max(len(c) for c in completions)
    if longest > cfg.max_completion_length:  # GRPO would cut such answers: a warm-up toward truncation
        raise ValueError(f"a warm-up solution has {longest} tokens, more than the recipe's "
                         f"max_completion_length={cfg.max_completion_length}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=wcfg.learning_rate, weight_decay=0.0)

    with open(out / "warmup_metrics.jsonl", "w") as log:
        for step in range(1, wcfg.steps + 1):
            start = time.perf_counter()
            batch = slice((step - 1) * wcfg.batch_size, step * wcfg.batch_size)
            ids = completions[batch]
            with autocast:
                logprobs = completion_logprobs(model, prompts[batch], ids, pad_id=tokenizer.pad_token_id)  # [B, T]
            mask = torch.zeros_like(logprobs)  # [B, T]
            for i, c in enumerate(ids):
                mask[i, : len(c)] = 1.0
            loss, metrics = sft_loss(logprobs, mask)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), wcfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise RuntimeError(f"warm-up step {step}: gradient norm {grad_norm.item()}; lower learning_rate")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            row = {"step": step, **metrics, "grad_norm": grad_norm.item(), "seconds": time.perf_counter() - start}
            log.write(json.dumps(row) + "\n")
            log.flush()
            if step % wcfg.logging_steps == 0 or step in (1, wcfg.steps):
                print(f"warm-up step {step}/{wcfg.steps}: nll {row['nll']:.3f} p(token) {row['mean_token_prob']:.2f} "
                      f"grad {row['grad_norm']:.2f} | {row['seconds']:.1f}s", flush=True)

    model.eval()
    folder = out / "model"
    model.to(low).save_pretrained(folder, safe_serialization=True)  # in the recipe's dtype
    tokenizer.save_pretrained(folder)
    (out / "warmup_config.yaml").write_text(yaml.safe_dump(asdict(wcfg), sort_keys=False))
    return folder
