"""A tiny randomly initialised LM and a synthetic task, for end-to-end trainer tests.

The model is a 2-layer Llama over a 32-word vocabulary (word-level tokenizer), so a fresh
model samples nearly uniformly and a reward is learnable in a few dozen steps on a CPU.
Task: the reward `says_a` is the fraction of completion words that are "a" (~1/30 at the start).

    python tests/tiny_task.py MODEL_DIR OUT_DIR [--reward=NAME] [--resume] [key=value ...]

--reward=NAME  train on one of REWARDS (default says_a)
--conversational  a dataset in TRL's conversational format (a `prompt` column of messages ending in
               an assistant prefill); the model needs a chat template (`with_chat_template`)
--audit-collectives  fail if minigrpo calls a torch.distributed collective other than through
               minigrpo/collectives.py (see tests/test_collectives.py)
Run as a script so each training run gets a fresh process (vLLM and DeepSpeed keep global state).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

WORDS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["x1", "x2"]


def free_port() -> str:
    """A free local TCP port, for torchrun and the rendezvous store (the default 29500 + pid % 1000 can collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def build_tiny_model(folder: Path, seed: int = 0, initializer_range: float = 0.02, tokenizer=None) -> Path:
    """Write a HF folder (config, safetensors, tokenizer) for a fresh random tiny Llama.

    `initializer_range` (the std of the random weights): LoRA tests use 0.08. At 0.02 the frozen
    tied head caps what adapters can do: a final hidden state of RMS 1 (the norm) against
    embeddings of norm ~0.02 * sqrt(128) gives logits below ~2.6, so p("a") <= ~0.3, where the
    LoRA runs plateaued; full fine-tuning grows the embeddings instead.
    `tokenizer`: saved instead of the word-level one (e.g. a real model's, for prompts of real text
    with a chat template); the model then takes its vocabulary and 1024 positions."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if tokenizer is None:
        vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
        positions = 128
    else:
        positions = 1024
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=positions,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, initializer_range=initializer_range,
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


def says_a_trl(prompts, completions, completion_ids, trainer_state, **kwargs):
    """`says_a` written the way TRL's documentation writes a conversational reward, checking on the way
    that it receives what TRL passes: prompts as messages without the prefill, completions as one
    assistant message that starts with the prefill, the token ids, and the trainer state."""
    contents = [completion[0]["content"] for completion in completions]
    for prompt, completion, content, ids in zip(prompts, completions, contents, completion_ids):
        words = content[len(PREFILL):].split()  # TRL: content = prefill + text (the word tokenizer decodes no space)
        if not (prompt[-1]["role"] == "user" and completion[0]["role"] == "assistant" and content.startswith(PREFILL)
                and sum(i > 2 for i in ids) == len(words)  # ids 0-2 (pad, eos, unk) decode to nothing
                and isinstance(trainer_state.global_step, int)):
            raise TypeError(f"not what TRL passes: {prompt!r} {completion!r} {ids!r} {trainer_state!r}")
    return says_a([c[len(PREFILL):] for c in contents])


REWARDS = {f.__name__: f for f in (says_a, says_a_negated, starts_with_a, says_a_trl)}
PREFILL = "x1"  # the conversational dataset's assistant prefill


def conversational_dataset(n: int = 64, seed: int = 0):
    """`tiny_dataset` in TRL's conversational format: the prompt as a user message plus an assistant prefill."""
    from datasets import Dataset

    plain = tiny_dataset(n, seed)
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": p}, {"role": "assistant", "content": PREFILL}]
                                         for p in plain["prompt"]]})


def with_chat_template(model_dir: Path, dest: Path) -> Path:
    """A copy of the tiny model whose tokenizer has a chat template: the messages' contents joined by spaces."""
    import json
    import shutil

    shutil.copytree(model_dir, dest)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
                               "{% if add_generation_prompt %} {% endif %}")
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


def tiny_dataset(n: int = 64, seed: int = 0):
    import random

    rng = random.Random(seed)
    columns = {"prompt": [" ".join(rng.choices(WORDS[1:], k=4)) for _ in range(n)]}
    try:
        from datasets import Dataset
    except ModuleNotFoundError:  # the GPU check's machine (make test-gpu) has no `datasets`
        return Rows(columns)
    return Dataset.from_dict(columns)


class Rows:
    """The part of `datasets.Dataset` that `train()` reads: len, column_names, rows, columns."""

    def __init__(self, columns: dict[str, list]):
        self.columns = columns
        self.column_names = list(columns)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __iter__(self):
        return (dict(zip(self.column_names, row)) for row in zip(*self.columns.values()))

    def __getitem__(self, column: str) -> list:
        return self.columns[column]


# Steps of the learn-and-twin tests (test_trainer.py, test_trainer_algorithms.py, test_async.py):
# the tiny task is learned by step ~10-20 (reward 0.82 at step 9, 1.0 from step 19, measured
# 2026-12-07), so 15 steps of 32 completions test learning strictly (they were 30 until issue 25). The twin runs as many: a sign error in the trainer would
# make the twin learn "a" as the learn run does, to a tail mean > 0.8 by then, far above its 0.05 bound.
LEARN_STEPS = 15

TINY_DEFAULTS = [
    "max_steps=30", "prompts_per_step=4", "num_generations=8", "gradient_accumulation_steps=2",
    "max_prompt_length=16", "max_completion_length=8", "learning_rate=3e-3", "warmup_ratio=0.0",
    "lr_scheduler_type=constant", "beta=0.0", "success_reward=says_a", "eval_num_samples=8",
    "num_completion_samples=2", "vllm_kv_cache_gib=0.25", "vllm_enforce_eager=true",
    "eval_before_training=false",  # rows[0] is step 1; test_trainer checks the step-0 evaluation
]


def eager_everywhere() -> None:
    """The tiny runs' vLLM runs eager (vllm_enforce_eager in TINY_DEFAULTS), and so, with this, do the
    small helpers vLLM's sampler compiles with torch.compile whatever that setting: their compile took
    2.3 s of a 4-step run's 16 s, in every process that starts an engine (the rollout server inherits
    this environment), and the same logprobs come out eager (measured 2026-12-07). minigrpo itself
    compiles nothing. Before torch is imported; a test may set it otherwise."""
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")


def audit_collectives() -> None:
    """Wrap torch.distributed's collectives so that a call whose nearest caller outside
    torch.distributed and deepspeed.comm is a minigrpo file other than collectives.py raises."""
    import atexit

    import torch.distributed as dist

    import minigrpo

    package = os.path.dirname(minigrpo.__file__) + os.sep
    allowed = package + "collectives.py"
    seen = [0]

    def wrap(name, fn):
        def checked(*args, **kwargs):
            seen[0] += 1
            frame = sys._getframe(1)
            while frame and any(p in frame.f_code.co_filename for p in (f"torch{os.sep}distributed", f"deepspeed{os.sep}comm")):
                frame = frame.f_back
            caller = frame.f_code.co_filename if frame else ""
            if caller.startswith(package) and caller != allowed:
                raise AssertionError(f"torch.distributed.{name} called from {caller}:{frame.f_lineno}, "
                                     "not through minigrpo.collectives")
            return fn(*args, **kwargs)
        return checked

    for name in ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
                 "broadcast_object_list", "barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor",
                 "gather", "scatter", "all_to_all", "all_to_all_single", "send", "recv"):
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))
    def report():  # one write: both ranks report on torchrun's shared stdout, and lines must not run together
        sys.stdout.write(f"[audit] collectives checked: {seen[0]}\n")
        sys.stdout.flush()

    atexit.register(report)


def main(argv: list[str]) -> None:
    eager_everywhere()
    from minigrpo import Config, train

    flags = dict(a[2:].partition("=")[::2] for a in argv if a.startswith("--"))
    if os.environ.get("MINIGRPO_TEST_DETERMINISTIC") == "1":
        # tests/test_gpu.py's exact resume: CUDA's embedding backward adds with atomics (run-to-run
        # differences in the last bits) unless deterministic kernels are asked for; warn_only: an op
        # without one runs as before and says so. Needs CUBLAS_WORKSPACE_CONFIG, set by the test.
        import torch

        torch.use_deterministic_algorithms(True, warn_only=True)
    if "audit-collectives" in flags:
        audit_collectives()
    model_dir, out_dir, *overrides = [a for a in argv if not a.startswith("--")]
    # the library defaults, then the tiny task's, then the caller's
    cfg = Config.load(None, TINY_DEFAULTS + [f"model={model_dir}", f"output_dir={out_dir}"] + overrides)
    reward = REWARDS[flags.get("reward", "says_a")]
    data = conversational_dataset if "conversational" in flags else tiny_dataset
    train(cfg, [reward], data(), data(16, seed=1), template=None, resume="resume" in flags)
    print(out_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
