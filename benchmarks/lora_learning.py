"""LoRA vs full fine-tuning, learning: one recipe trained both ways, held-out evaluations side by side.

Both sides in one run of this script, each in its own process, one after the other, same seed, same tasks.

    .venv/bin/python benchmarks/lora_learning.py --eval-steps 4 learning_rate=1e-3   # default recipe, 12 steps
    .venv/bin/python benchmarks/lora_learning.py --config recipes/countdown_cpu_learn.yaml \\
        --model outputs/countdown-warmup/model --steps 40 --eval-steps 10 lora_rank=16 learning_rate=1e-3

`--both key=value` sets both sides; trailing key=value pairs configure the LoRA side only (default: lora_rank=16 lora_alpha=32, the recipe's
learning rate unless given). The held-out figures are the trainer's own evaluations
(`eval/format_rate`, `eval/success_rate` in metrics.jsonl: greedy, the recipe's eval_num_samples
test tasks, which load_countdown keeps disjoint from train). Prints the table per evaluation step
and, per side, the first step that reaches the full run's final rate: the issue's target is LoRA
reaching the same held-out format rate (and success, where the full run has any) in no more steps.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RATES = ("eval/format_rate", "eval/success_rate")


def run_side(name: str, args: argparse.Namespace, overrides: list[str]) -> dict[int, dict]:
    """Train one side; returns {step: its evaluation row}."""
    out = Path(tempfile.mkdtemp(prefix=f"lora-learn-{name}-"))
    cmd = [sys.executable, str(ROOT / "examples" / "countdown.py"), "--output-dir", str(out),
           *(["--config", args.config] if args.config else []), *(["--model", args.model] if args.model else []),
           *(["--max-steps", str(args.steps)] if args.steps else []),
           f"eval_steps={args.eval_steps}", "save_steps=0", *args.both, *overrides]  # options first: argparse
    print("running:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} side failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval/success_rate" in r}
    steps = [r for r in rows if "success_rate" in r]
    late = steps[len(steps) // 2:]  # the second half of training: where exploration has gone, or not
    print(f"{name}: {time.perf_counter() - start:.0f} s, outputs in {out}; second half of training: "
          f"sampled success {mean(late, 'success_rate'):.2f}, groups without spread {mean(late, 'zero_spread_groups'):.2f}, "
          f"entropy {mean(late, 'entropy'):.3f} nats/token (steps that trained); "
          f"train phase {mean(steps[1:], 'time/train'):.1f} s/step", flush=True)
    return evals


def mean(rows: list[dict], key: str) -> float:
    """Mean over the rows with a number under `key` (the metrics log writes "nan" for a skipped step's entropy)."""
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    return sum(values) / len(values) if values else float("nan")


def first_step_reaching(evals: dict[int, dict], key: str, level: float) -> int | None:
    return next((s for s in sorted(evals) if evals[s].get(key, -1.0) >= level - 1e-9), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML recipe (default: examples/countdown.py's, recipes/countdown_cpu.yaml)")
    p.add_argument("--model", help="start model for both sides, e.g. the warm-up's")
    p.add_argument("--steps", type=int, help="max_steps (default: the recipe's)")
    p.add_argument("--eval-steps", type=int, required=True, help="evaluate every N steps (and at 0 and the end)")
    p.add_argument("--sides", default="full,lora", choices=["full,lora", "full", "lora"], metavar="full,lora|full|lora",
                   help="one side alone prints its evaluations only (a comparison is one run of both)")
    p.add_argument("--both", action="append", default=[], metavar="key=value", help="a setting for both sides")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="for the LoRA side")
    args = p.parse_intermixed_args()
    if args.overrides and "lora" not in args.sides:
        p.error("key=value settings are for the LoRA side, which --sides leaves out")
    if any(kv.startswith("lora_") for kv in args.both):
        p.error("lora_* settings go after the options (LoRA side only): --both would be overridden")
    settings = {"full": ["lora_rank=0"], "lora": ["lora_rank=16", "lora_alpha=32", *args.overrides]}
    sides = {name: run_side(name, args, settings[name]) for name in args.sides.split(",")}
    if len(sides) == 1:  # one side alone (e.g. another LoRA learning rate): its evaluations, no comparison
        print(json.dumps({name: {step: {k: row[k] for k in RATES if k in row} for step, row in evals.items()}
                          for name, evals in sides.items()}))
        return

    full, lora = sides["full"], sides["lora"]
    print(f"\n{'step':>5}{'format full':>13}{'format LoRA':>13}{'success full':>14}{'success LoRA':>14}{'tasks':>7}")
    for step in sorted(set(full) | set(lora)):
        f, lo = full.get(step, {}), lora.get(step, {})
        cells = [f"{row[k]:.2f}" if k in row else "-" for k in RATES for row in (f, lo)]
        tasks = int(f.get("eval/tasks", lo.get("eval/tasks", 0)))
        print(f"{step:>5}{cells[0]:>13}{cells[1]:>13}{cells[2]:>14}{cells[3]:>14}{tasks:>7}")
    last = full[max(full)]
    verdict = {}
    for key in RATES:
        level = last.get(key)
        if level is None:
            continue
        steps = {side: first_step_reaching(sides[side], key, level) for side in sides}
        # full never rose above its start: both "reach" its final rate at step 0, a comparison of nothing
        trivial = level <= full[min(full)].get(key, 0.0) + 1e-9
        verdict[key] = {"full_final": level, "first_step": steps, "trivial": trivial,
                        "lora_in_no_more_steps": None if trivial else steps["lora"] is not None and steps["lora"] <= steps["full"]}
        best = {side: max(r.get(key, 0.0) for r in sides[side].values()) for side in sides}
        print(f"{key}: full's final {level:.2f} first reached at step {steps['full']} (full), {steps['lora']} (LoRA)"
              f"{' (trivial: full did not rise above step 0)' if trivial else ''}; LoRA's final "
              f"{lora[max(lora)].get(key, 0.0):.2f}; best full {best['full']:.2f} LoRA {best['lora']:.2f}")
    print(json.dumps({"verdict": verdict}))


if __name__ == "__main__":
    main()
