"""A tiny randomly initialised LM and a synthetic task, for end-to-end trainer tests.

The model is a 2-layer Llama over a 32-word vocabulary (word-level tokenizer), so a fresh
model samples nearly uniformly and a reward is learnable in a few dozen steps on a CPU.
Task: the reward `says_a` is the fraction of completion words that are "a" (~1/30 at the start).

    python tests/tiny_task.py MODEL_DIR OUT_DIR [--reward=NAME] [--resume] [key=value ...]

--reward=NAME  train on one of REWARDS (default says_a)
Run as a script so each training run gets a fresh process (vLLM and DeepSpeed keep global state).
"""

from __future__ import annotations

import sys
from pathlib import Path

WORDS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["x1", "x2"]


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write a HF folder (config, safetensors, tokenizer) for a fresh random tiny Llama."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, eos_token_id=1, pad_token_id=0, bos_token_id=None,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def says_a(completions, **_):
    """Fraction of the completion's words that are "a"."""
    return [sum(w == "a" for w in c.split()) / max(len(c.split()), 1) for c in completions]


def says_a_negated(completions, **kw):
    """The same reward with its sign flipped: a trainer that follows it must unlearn "a"."""
    return [-v for v in says_a(completions, **kw)]


def starts_with_a(completions, **_):
    """1 when the first word is "a", else 0: sparse (~1/31 at the start), so many groups score all 0."""
    return [1.0 if c.split()[:1] == ["a"] else 0.0 for c in completions]


REWARDS = {f.__name__: f for f in (says_a, says_a_negated, starts_with_a)}


def tiny_dataset(n: int = 64, seed: int = 0):
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    return Dataset.from_dict({"prompt": [" ".join(rng.choices(WORDS[1:], k=4)) for _ in range(n)]})


TINY_DEFAULTS = [
    "max_steps=30", "prompts_per_step=4", "num_generations=8", "gradient_accumulation_steps=2",
    "max_prompt_length=16", "max_completion_length=8", "learning_rate=3e-3", "warmup_ratio=0.0",
    "lr_scheduler_type=constant", "beta=0.0", "success_reward=says_a", "eval_num_samples=8",
    "num_completion_samples=2", "sync_check_atol=1e-3", "vllm_kv_cache_gib=0.25", "vllm_enforce_eager=true",
]


def main(argv: list[str]) -> None:
    from minigrpo import Config, train

    flags = dict(a[2:].partition("=")[::2] for a in argv if a.startswith("--"))
    model_dir, out_dir, *overrides = [a for a in argv if not a.startswith("--")]
    # the library defaults, then the tiny task's, then the caller's
    cfg = Config.load(None, TINY_DEFAULTS + [f"model={model_dir}", f"output_dir={out_dir}"] + overrides)
    reward = REWARDS[flags.get("reward", "says_a")]
    train(cfg, [reward], tiny_dataset(), tiny_dataset(16, seed=1), template=None, resume="resume" in flags)
    print(out_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
