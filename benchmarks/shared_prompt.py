"""Forward + backward time of completion log-probs with the group's prompt run once vs repeated.

    .venv/bin/python benchmarks/shared_prompt.py [--reps 2 --completions 8 --prompt 150 --length 120]

SmolLM2-135M (the default model), fp32, random tokens; the two paths alternate in one process so
they see the same machine load. Equivalence of their values and gradients is tested in
tests/test_scoring.py; this script only times them.
"""

import argparse
import time

import torch

from minigrpo.models import load_causal_lm, resolve_model
from minigrpo.scoring import completion_logprobs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--completions", type=int, default=8)
    p.add_argument("--prompt", type=int, default=150)
    p.add_argument("--length", type=int, default=120)
    args = p.parse_args()
    torch.manual_seed(0)
    model = load_causal_lm(resolve_model("smollm2-135m-instruct"), torch.float32).train()
    prompt = torch.randint(100, 40000, (args.prompt,)).tolist()
    comps = [torch.randint(100, 40000, (args.length,)).tolist() for _ in range(args.completions)]
    times = {True: [], False: []}
    for _ in range(args.reps):
        for share in (True, False):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            completion_logprobs(model, [prompt] * len(comps), comps, 1.0, share_prompts=share).sum().backward()
            times[share].append(time.perf_counter() - start)
    print(f"{args.completions} completions x {args.length} tokens of one {args.prompt}-token prompt, fwd+bwd:")
    print(f"shared prompt:   {[round(t, 1) for t in times[True]]} s")
    print(f"repeated prompt: {[round(t, 1) for t in times[False]]} s")
    print(f"ratio (repeated / shared, best of each): {min(times[False]) / min(times[True]):.2f}x")


if __name__ == "__main__":
    main()
