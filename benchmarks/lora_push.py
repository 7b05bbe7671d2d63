"""How the rollout engine should get a LoRA policy's weights on this machine: vLLM's own LoRA
requests (save the adapter, the engine loads it, every forward adds B A x) vs minigrpo's merged push
(W + s B A into the plain engine, what `lora_rank > 0` does). Both in one run, one vLLM engine.

    .venv/bin/python benchmarks/lora_push.py                 # SmolLM2-135M, rank 16, 2 x 8 x 128 tokens

Prints the adapter save + load cost per step and the generation throughput with and without the
LoRA request; compare with `time/push` of the merged push (benchmarks/lora.py, ~1.2-1.3 s here).
This script talks to vLLM directly (it measures vLLM's LoRA path, which minigrpo does not use).
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process, as minigrpo's colocated engine

import torch  # noqa: E402

from minigrpo import lora  # noqa: E402
from minigrpo.batching import prepare_prompts  # noqa: E402
from minigrpo.data import R1_COUNTDOWN, load_countdown  # noqa: E402
from minigrpo.models import load_causal_lm, load_tokenizer, resolve_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="fresh adapters loaded (one per training step)")
    args = p.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    path = str(resolve_model(args.model))
    llm = LLM(model=path, dtype="float32", enable_lora=True, max_lora_rank=args.rank, max_loras=1,
              enforce_eager=True, max_model_len=512, seed=0, kv_cache_memory_bytes=1 << 30)
    model = load_causal_lm(path)
    targets = lora.default_targets(model)
    lora.add_adapters(model, args.rank, 2.0 * args.rank)
    tasks = prepare_prompts(load_countdown("generate", num_samples=20, seed=42)["train"].select(range(2)),
                            load_tokenizer(path), R1_COUNTDOWN, 256)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in tasks.ids]
    one_token = SamplingParams(max_tokens=1, temperature=0)
    rollout = SamplingParams(n=8, max_tokens=128, temperature=1.0, seed=0, ignore_eos=True)
    root = Path(tempfile.mkdtemp(prefix="lora-push-"))
    for step in range(1, args.steps + 1):
        with torch.no_grad():  # a new adapter each step, as after an optimizer step
            for name, param in model.named_parameters():
                if name.endswith("lora_B"):
                    param.normal_(0, 1e-3)
        start = time.perf_counter()
        named = {n: p.detach() for n, p in model.named_parameters() if lora.is_adapter_name(n)}
        lora.save_adapter(root / f"step{step}", lora.peft_names(named), rank=args.rank, alpha=2.0 * args.rank,
                          targets=targets, base_model=path)
        saved = time.perf_counter()
        request = LoRARequest(f"step{step}", step, str(root / f"step{step}"))
        llm.generate(prompts[:1], one_token, lora_request=request, use_tqdm=False)  # loads it
        loaded = time.perf_counter()
        llm.generate(prompts[:1], one_token, lora_request=request, use_tqdm=False)  # already loaded
        again = time.perf_counter()
        print(f"step {step}: save {saved - start:.3f} s, load + 1 token {loaded - saved:.3f} s "
              f"(1 token once loaded: {again - loaded:.3f} s)", flush=True)
    tokens = len(prompts) * rollout.n * rollout.max_tokens
    for _ in range(2):
        start = time.perf_counter()
        llm.generate(prompts, rollout, use_tqdm=False)
        base = time.perf_counter() - start
        start = time.perf_counter()
        llm.generate(prompts, rollout, lora_request=request, use_tqdm=False)
        with_lora = time.perf_counter() - start
        print(f"{tokens} completion tokens: plain weights {base:.2f} s ({tokens / base:.0f} tok/s), "
              f"LoRA request r{args.rank} {with_lora:.2f} s ({tokens / with_lora:.0f} tok/s): "
              f"+{with_lora - base:.1f} s per step", flush=True)


if __name__ == "__main__":
    main()
