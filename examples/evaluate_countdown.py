"""Greedy evaluation of a model on held-out Countdown tasks: format and success rate, per number count.

    python examples/evaluate_countdown.py --model smollm2-135m-instruct
    python examples/evaluate_countdown.py --model outputs/countdown-cpu/checkpoints/step-000030/model
    python examples/evaluate_countdown.py --model outputs/lora-run/checkpoints/step-000060   # LoRA: merged first
    python examples/evaluate_countdown.py --model ... --min-numbers 2 --max-numbers 3 --max-number 20  # a tier

The tasks are the test split that `examples/countdown.py` holds out with the same recipe (same
dataset, dataset_size, test_size, seed and generator difficulty), so a base model and its trained
checkpoint are scored on the same tasks. The difficulty flags replace the recipe's generator
settings (dataset: generate), for before/after tables on any tier. One greedy completion per task
with the vLLM engine, generated twice when the recipe has stop strings: without them (what a user of
the checkpoint gets: the model must end its answer itself) and with them (as in training).
"""

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as examples/countdown.py: before torch starts OpenMP

from minigrpo import Config  # noqa: E402
from minigrpo.batching import prepare_prompts  # noqa: E402
from minigrpo.data import R1_COUNTDOWN, load_countdown  # noqa: E402
from minigrpo.evaluation import greedy_sampling  # noqa: E402
from minigrpo.lora import adapter_folder, export_merged  # noqa: E402
from minigrpo.models import load_tokenizer, resolve_model, set_transformers_log_level  # noqa: E402
from minigrpo.rewards import Reward, equation_reward, format_reward, score_completions  # noqa: E402
from minigrpo.rollout import make_engine  # noqa: E402

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "countdown_cpu.yaml"
TIER_FLAGS = ("min_numbers", "max_numbers", "max_number", "max_target")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--config", default=str(DEFAULT_RECIPE), help="recipe whose test split to use")
    p.add_argument("--num", type=int, default=200, help="held-out tasks")
    for flag in TIER_FLAGS:
        p.add_argument("--" + flag.replace("_", "-"), type=int, help=f"the generator's {flag} (default: the recipe's)")
    p.add_argument("--stop", choices=["both", "without", "with"], default="both",
                   help="generate without the recipe's stop strings, with them, or both (default)")
    p.add_argument("--samples", type=int, default=3, help="completions to print")
    p.add_argument("--json", help="write the result here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    tier = [f"generator_{k}={getattr(args, k)}" for k in TIER_FLAGS if getattr(args, k) is not None]
    cfg = Config.load(args.config, tier + args.overrides)  # checked before anything loads
    set_transformers_log_level(cfg.log_level)

    test = load_countdown(cfg.dataset, num_samples=cfg.dataset_size, test_size=cfg.test_size, seed=cfg.seed,
                          difficulty=cfg.generator_difficulty())["test"]
    test = test.select(range(min(args.num, len(test))))
    adapter = adapter_folder(args.model)
    if adapter is not None:  # a LoRA checkpoint: vLLM gets the base with the adapter merged in
        path = export_merged(adapter, Path(tempfile.mkdtemp(prefix="minigrpo-merged-")), cfg.dtype)
    else:
        path = resolve_model(args.model, cfg.model_cache_dir)
    tokenizer = load_tokenizer(path)
    tasks = prepare_prompts(test, tokenizer, R1_COUNTDOWN, cfg.max_prompt_length)
    memory = {"gpu_memory_utilization": cfg.vllm_gpu_memory_utilization, "kv_cache_gib": cfg.vllm_kv_cache_gib}
    engine = make_engine("vllm", path, dtype=cfg.dtype, seed=cfg.seed, log_level=cfg.log_level,
                         max_model_len=cfg.max_prompt_length + cfg.max_completion_length,
                         enforce_eager=cfg.vllm_enforce_eager, **{k: v for k, v in memory.items() if v is not None})
    modes = {"both": (False, True), "without": (False,), "with": (True,)}[args.stop]
    if not cfg.stop:  # nothing to stop at: one pass is both
        modes = (False,)
    result = {"model": args.model, "tasks": len(test), "difficulty": cfg.generator_difficulty(),
              "stop_strings": cfg.stop}
    for with_stop in modes:
        batch = engine.generate(tasks.ids, greedy_sampling(cfg, stop=with_stop))  # as the trainer's evaluations
        scores = score_completions([Reward(format_reward), Reward(equation_reward)], batch.texts, tasks.prompts,
                                   tasks.columns, 1)
        name = "with_stop" if with_stop else "without_stop"
        result[name] = summarize(test["nums"], scores.per_reward, batch)
        print(f"=== {name.replace('_', ' ')} strings {cfg.stop if with_stop else ''}")
        for i in range(min(args.samples, len(batch))):
            print(f"--- task {test[i]['nums']} -> {test[i]['target']}\n{batch.texts[i]}\n")
        print(table(result[name]))
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def summarize(nums: list[list[int]], per_reward: dict[str, list[float]], batch) -> dict:
    """Format and success rate overall and per number count ("by_count"), mean completion length
    and the fraction cut by the length limit."""
    by_count = defaultdict(lambda: [0, 0, 0])  # numbers in the task -> [tasks, formatted, solved]
    for ns, f, s in zip(nums, per_reward["format_reward"], per_reward["equation_reward"]):
        row = by_count[len(ns)]
        row[0], row[1], row[2] = row[0] + 1, row[1] + (f == 1.0), row[2] + (s == 1.0)
    n = len(nums)
    return {
        "format_rate": sum(r[1] for r in by_count.values()) / n,
        "success_rate": sum(r[2] for r in by_count.values()) / n,
        "completion_length_mean": sum(map(len, batch.completion_ids)) / n,
        "truncated_fraction": sum(batch.truncated) / n,
        "by_count": {str(k): {"tasks": t, "format_rate": f / t, "success_rate": s / t}
                     for k, (t, f, s) in sorted(by_count.items())},
    }


def table(summary: dict) -> str:
    lines = [f"{'numbers':>8} {'tasks':>6} {'format':>7} {'success':>8}"]
    for k, r in summary["by_count"].items():
        lines.append(f"{k:>8} {r['tasks']:>6} {r['format_rate']:>7.3f} {r['success_rate']:>8.3f}")
    total = sum(r["tasks"] for r in summary["by_count"].values())
    lines.append(f"{'all':>8} {total:>6} {summary['format_rate']:>7.3f} {summary['success_rate']:>8.3f}"
                 f"   (mean length {summary['completion_length_mean']:.0f} tokens, "
                 f"{summary['truncated_fraction']:.0%} cut by the length limit)")
    return "\n".join(lines)


if __name__ == "__main__":  # vLLM starts worker processes by spawn: the guard is required
    main()
