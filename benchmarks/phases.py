"""Where a GRPO step's time goes, and how close training runs to this machine's matmul ceiling.

    .venv/bin/python benchmarks/phases.py                      # runs the default recipe, 4 steps
    .venv/bin/python benchmarks/phases.py --steps 6 max_completion_length=64
    .venv/bin/python benchmarks/phases.py --metrics outputs/countdown-cpu/metrics.jsonl

Prints the mean seconds per phase (generation, reward, reference, training, weight push) over
the steps after the first (which carries one-off warm-up), and the achieved FLOP/s of the
training and reference phases, estimated as 6 x parameters x tokens (forward + backward) and
2 x parameters x tokens (forward) from the token counts the trainer logs, against a plain fp32
matmul measured in the same run: the ceiling of a dense model on this machine.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("generate", "reward", "reference", "train", "push")


def matmul_flops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def count_parameters(model: str) -> int:
    from safetensors import safe_open

    from minigrpo.models import resolve_model

    total = 0
    for f in resolve_model(model).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


# The setting the phase figures of docs/performance.md were measured with: the default recipe until 2026-12-03
# (2 prompts x 8 completions, temperature 1.0, beta 0.04, lr 1e-6), before it became the 12-step
# format-learning run. Overrides given on the command line come after, so they win.
MEASURED_SETTING = ["prompts_per_step=2", "gradient_accumulation_steps=4", "temperature=1.0", "beta=0.04",
                    "learning_rate=1e-6", "lr_scheduler_type=cosine", "eval_before_training=false",
                    "rewards=[format_reward,equation_reward]", "reward_weights=null"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--metrics", help="summarize this metrics.jsonl instead of running")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()

    ceiling = matmul_flops()
    if args.metrics:
        path = Path(args.metrics)
    else:
        out = Path(tempfile.mkdtemp(prefix="phases-"))
        cmd = [sys.executable, str(ROOT / "examples" / "countdown.py"), "--max-steps", str(args.steps),
               "--output-dir", str(out), "--model", args.model, *MEASURED_SETTING, *args.overrides]
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [r for r in rows if r["step"] >= 1]  # no step-0 evaluation row
    rows = rows[1:] if len(rows) > 1 else rows  # step 1 carries warm-up
    params = count_parameters(args.model)

    def mean(key):
        return sum(r[key] for r in rows) / len(rows)

    step = mean("time/step")
    print(f"\n{path}: {len(rows)} steps averaged (first step excluded), model {args.model} ({params / 1e6:.1f} M parameters)")
    print(f"{'phase':<12}{'seconds':>10}{'share':>8}")
    for ph in PHASES:
        print(f"{ph:<12}{mean('time/' + ph):>10.2f}{mean('time/' + ph) / step:>8.1%}")
    print(f"{'step':<12}{step:>10.2f}")
    print(f"generation: {mean('tokens_per_second'):.0f} completion tokens/s")
    print(f"matmul ceiling (fp32 2048^3, measured now): {ceiling / 1e9:.1f} GFLOP/s")
    for phase, key, factor in (("train", "tokens/train", 6), ("reference", "tokens/reference", 2)):
        if mean(key) > 0 and mean("time/" + phase) > 0:
            achieved = factor * params * mean(key) / mean("time/" + phase)
            print(f"{phase}: {mean(key):.0f} tokens/step, ~{achieved / 1e9:.1f} GFLOP/s "
                  f"({factor} x params x tokens / seconds) = {achieved / ceiling:.0%} of the matmul ceiling")


if __name__ == "__main__":
    main()
