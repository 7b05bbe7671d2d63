"""Greedy evaluation of a model on held-out Countdown tasks: format rate and success rate.

    python examples/evaluate_countdown.py --model smollm2-135m-instruct
    python examples/evaluate_countdown.py --model outputs/countdown-learn/checkpoints/step-000060/model
    python examples/evaluate_countdown.py --model outputs/lora-run/checkpoints/step-000060   # LoRA: merged first

The tasks are the test split that `examples/countdown.py` holds out with the same recipe (same
dataset, dataset_size, test_size and seed), so a base model and its trained checkpoint are scored
on the same tasks. One greedy completion per task with the vLLM engine.
"""

import argparse
import json
import tempfile
from pathlib import Path

from minigrpo import Config
from minigrpo.batching import prepare_prompts
from minigrpo.data import R1_COUNTDOWN, load_countdown
from minigrpo.evaluation import greedy_sampling
from minigrpo.lora import adapter_folder, export_merged
from minigrpo.models import load_tokenizer, resolve_model
from minigrpo.rewards import Reward, equation_reward, format_reward, score_completions
from minigrpo.rollout import make_engine

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "countdown_cpu.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--config", default=str(DEFAULT_RECIPE), help="recipe whose test split to use")
    p.add_argument("--num", type=int, default=200, help="held-out tasks")
    p.add_argument("--samples", type=int, default=3, help="completions to print")
    p.add_argument("--json", help="write the result here")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    cfg = Config.load(args.config, args.overrides)

    test = load_countdown(cfg.dataset, num_samples=cfg.dataset_size, test_size=cfg.test_size, seed=cfg.seed)["test"]
    test = test.select(range(min(args.num, len(test))))
    adapter = adapter_folder(args.model)
    if adapter is not None:  # a LoRA checkpoint: vLLM gets the base with the adapter merged in
        path = export_merged(adapter, Path(tempfile.mkdtemp(prefix="minigrpo-merged-")), cfg.dtype)
    else:
        path = resolve_model(args.model, cfg.model_cache_dir)
    tokenizer = load_tokenizer(path)
    tasks = prepare_prompts(test, tokenizer, R1_COUNTDOWN, cfg.max_prompt_length)
    engine = make_engine("vllm", path, dtype=cfg.dtype, seed=cfg.seed,
                         max_model_len=cfg.max_prompt_length + cfg.max_completion_length)
    batch = engine.generate(tasks.ids, greedy_sampling(cfg))  # as the trainer's evaluations
    scores = score_completions([Reward(format_reward), Reward(equation_reward)], batch.texts, tasks.prompts,
                               tasks.columns, 1)
    fmt = sum(v == 1.0 for v in scores.per_reward["format_reward"]) / len(batch)
    ok = sum(v == 1.0 for v in scores.per_reward["equation_reward"]) / len(batch)
    lengths = [len(c) for c in batch.completion_ids]
    result = {"model": args.model, "tasks": len(batch), "format_rate": fmt, "success_rate": ok,
              "completion_length_mean": sum(lengths) / len(lengths),
              "truncated_fraction": sum(batch.truncated) / len(batch)}
    for i in range(min(args.samples, len(batch))):
        print(f"--- task {test[i]['nums']} -> {test[i]['target']}\n{batch.texts[i]}\n")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
