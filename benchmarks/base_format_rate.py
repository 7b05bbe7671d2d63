"""How often a model's samples hit the R1 format, strictly and by `tag_reward` milestone, and how
many groups get a reward spread from each: the measurement behind recipes/countdown_cpu_learn.yaml.

    .venv/bin/python benchmarks/base_format_rate.py [--model smollm2-135m-instruct --prompts 16
        --generations 8 --max-tokens 256 --temperatures 1.0 0.7]

The first `--prompts` tasks of the learning recipe's train split, `--generations` samples each
with vLLM, stopped at `</answer>`. A group with a spread is one whose G rewards are not all equal:
only those give GRPO a non-zero advantage.
"""

import argparse
import json
from pathlib import Path

from minigrpo import Config
from minigrpo.batching import prepare_prompts
from minigrpo.data import R1_COUNTDOWN, load_recipe_tasks
from minigrpo.models import load_tokenizer, resolve_model
from minigrpo.rewards import format_reward, tag_reward
from minigrpo.rollout import Sampling, make_engine

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "countdown_cpu_learn.yaml"


def spread_groups(values: list[float], g: int) -> int:
    return sum(len(set(values[i : i + g])) > 1 for i in range(0, len(values), g))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7])
    args = p.parse_args()
    cfg = Config.load(RECIPE)
    train = load_recipe_tasks(cfg)["train"]
    path = resolve_model(args.model, cfg.model_cache_dir)
    tasks = prepare_prompts(train.select(range(args.prompts)), load_tokenizer(path), R1_COUNTDOWN, cfg.max_prompt_length)
    engine = make_engine("vllm", path, dtype=cfg.dtype, seed=1, max_model_len=cfg.max_prompt_length + args.max_tokens)
    g = args.generations
    for temperature in args.temperatures:
        batch = engine.generate(tasks.ids, Sampling(n=g, max_tokens=args.max_tokens, temperature=temperature,
                                                    stop=("</answer>",), seed=0))
        strict, tags = format_reward(batch.texts), tag_reward(batch.texts)
        print(json.dumps({
            "temperature": temperature, "samples": len(batch),
            "strict_format": sum(v == 1.0 for v in strict),
            "tag_reward_counts": {str(k): tags.count(k) for k in sorted(set(tags))},
            "groups": args.prompts,
            "groups_with_spread_strict": spread_groups(strict, g),
            "groups_with_spread_tag_reward": spread_groups(tags, g),
            "truncated": sum(batch.truncated),
            "completion_tokens_mean": sum(len(c) for c in batch.completion_ids) / len(batch),
        }), flush=True)


if __name__ == "__main__":
    main()
