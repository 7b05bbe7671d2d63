"""Rollout speed: VLLMEngine vs TorchEngine in one run, plus the cost of a weight push.

    .venv/bin/python benchmarks/rollout.py                 # 64 completions x 256 tokens, both engines
    .venv/bin/python benchmarks/rollout.py --engines vllm --pushes 5

Workload: the default model (SmolLM2-135M-Instruct, fp32) on one Countdown prompt in the R1 format
(`minigrpo.data.R1_COUNTDOWN`), G completions of up to T tokens at temperature 1. Tokens/s counts
generated completion tokens over the wall time of one `generate` call (after a short warm-up).
vLLM runs first, in this process, as in training (the colocated layout). On a shared machine only
the ratio means much: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from minigrpo.data import R1_COUNTDOWN, render_prompt
from minigrpo.models import COMPLETE_MARKER, load_causal_lm, load_tokenizer, resolve_model
from minigrpo.rollout import Probe, Sampling, TorchEngine
from minigrpo.scoring import completion_logprobs

TASK = {"nums": [19, 36, 55, 7], "target": 65}


def timed_generate(engine, prompt_ids, sampling) -> tuple[float, int]:
    """Seconds and generated tokens of one generate call."""
    start = time.perf_counter()
    batch = engine.generate([prompt_ids], sampling)
    seconds = time.perf_counter() - start
    assert len(batch) == sampling.n
    return seconds, sum(len(c) for c in batch.completion_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n", type=int, default=64, help="completions (G)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--engines", default="vllm,torch")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    args = parser.parse_args()
    engines = args.engines.split(",")
    results: dict[str, float] = {}
    print(f"load average at start: {os.getloadavg()}")

    start = time.perf_counter()
    path = resolve_model(args.model)
    results["resolve_model_s"] = time.perf_counter() - start
    marker = path / COMPLETE_MARKER
    if marker.is_file():
        results["conversion_s (when first converted)"] = json.loads(marker.read_text())["seconds"]
    tokenizer = load_tokenizer(path)
    prompt_ids = tokenizer(render_prompt(tokenizer, TASK, R1_COUNTDOWN), add_special_tokens=False)["input_ids"]
    policy = load_causal_lm(path, torch.float32)
    sampling = Sampling(n=args.n, max_tokens=args.max_tokens, temperature=1.0, seed=0)
    warmup = Sampling(n=2, max_tokens=8, temperature=1.0, seed=0)
    print(f"model {path}, prompt {len(prompt_ids)} tokens, {args.n} x up to {args.max_tokens} tokens")

    if "vllm" in engines:
        from minigrpo.rollout.vllm_engine import VLLMEngine

        start = time.perf_counter()
        engine = VLLMEngine(path, seed=0, max_model_len=len(prompt_ids) + args.max_tokens + 8,
                            enforce_eager=args.enforce_eager)
        results["vllm_start_s"] = time.perf_counter() - start
        timed_generate(engine, prompt_ids, warmup)
        seconds, tokens = timed_generate(engine, prompt_ids, sampling)
        results.update(vllm_tokens=tokens, vllm_generate_s=seconds, vllm_tokens_per_s=tokens / seconds)

        probe_ids = prompt_ids[:64]
        with torch.no_grad():
            expected = completion_logprobs(policy, [probe_ids[:1]], [probe_ids[1:]], 1.0)[0]
        probe = Probe(tuple(probe_ids), tuple(expected.tolist()), 1e-3)
        load_s, check_s, total_s = [], [], []
        for _ in range(args.pushes):
            start = time.perf_counter()
            engine.push_weights(policy.named_parameters(), probe)
            total_s.append(time.perf_counter() - start)
            load_s.append(engine.last_load_seconds)
            check_s.append(engine.last_checksum_seconds)
        results["push_s (load + reset cache)"] = sum(load_s) / len(load_s)
        results["push_s (exact checksums, both sides)"] = sum(check_s) / len(check_s)
        results["push_s (all, with probe check)"] = sum(total_s) / len(total_s)

    if "torch" in engines:
        engine = TorchEngine(policy, tokenizer)
        timed_generate(engine, prompt_ids, warmup)
        seconds, tokens = timed_generate(engine, prompt_ids, sampling)
        results.update(torch_tokens=tokens, torch_generate_s=seconds, torch_tokens_per_s=tokens / seconds)

    if "vllm_tokens_per_s" in results and "torch_tokens_per_s" in results:
        results["vllm_over_torch"] = results["vllm_tokens_per_s"] / results["torch_tokens_per_s"]
    print(f"load average at end: {os.getloadavg()}")
    for key, value in results.items():
        print(f"{key:40s} {value:10.2f}" if isinstance(value, float) else f"{key:40s} {value:10d}")


if __name__ == "__main__":  # vLLM may start worker processes by spawn
    main()
