"""Mini-R1: teach a model the Countdown game with GRPO.

    python examples/countdown.py                                  # the default CPU recipe
    python examples/countdown.py --config recipes/qwen2.5-3b-countdown.yaml
    python examples/countdown.py --max-steps 50 learning_rate=2e-6 beta=0.0
    python examples/countdown.py --resume                         # continue the last checkpoint

Any config key can be overridden as key=value (see minigrpo/config.py).
"""

import argparse
import os
from pathlib import Path

# Before torch starts OpenMP: idle OpenMP threads that spin steal the CPU from everything else in
# the process and on the machine. On the 2-core dev machine, with other jobs running, the same
# 16-completion step took ~26 s to generate and ~44 s to train with PASSIVE (benchmarks/vs_trl.py)
# and ~115 s and ~210 s without it. An explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from minigrpo import Config, train  # noqa: E402
from minigrpo.cli import one_line_errors  # noqa: E402
from minigrpo.config import ConfigError  # noqa: E402
from minigrpo.console import launched_as_rank0  # noqa: E402
from minigrpo.models import resolve_model  # noqa: E402
from minigrpo.data import R1_COUNTDOWN, load_recipe_tasks  # noqa: E402
from minigrpo.rewards import (  # noqa: E402
    closeness_reward,
    equation_reward,
    format_reward,
    numbers_reward,
    tag_reward,
    think_arithmetic_reward,
)

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "countdown_cpu.yaml"
# the recipe's `rewards` names: the strict ones, and the shaping ones for small models
COUNTDOWN_REWARDS = {f.__name__: f for f in (format_reward, equation_reward, tag_reward, numbers_reward, closeness_reward,
                                             think_arithmetic_reward)}


def load_config(argv: list[str] | None = None) -> tuple[argparse.Namespace, Config]:
    """The command line read and the recipe loaded and checked, before anything heavy (also what
    tests/test_documented_commands.py runs on every command the docs show)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_RECIPE), help="YAML recipe")
    p.add_argument("--model", help="HF folder, hub name, or smollm2-135m-instruct")
    p.add_argument("--output-dir")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--rollout", choices=["vllm", "torch", "vllm_server"])
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--plan", action="store_true", help="print the per-GPU memory and disk plan and exit "
                   "(2 if it does not fit); loads no model")
    p.add_argument("--gpu-memory", help="the GPU's memory for --plan, e.g. 80GB (default: this machine's GPU, else 80GB)")
    p.add_argument("--world-size", type=int, help="training ranks for --plan (default: $WORLD_SIZE, else 1)")
    p.add_argument("--force", action="store_true", help="run even if the memory plan does not fit the GPU")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error in the command or config")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # appended by the deepspeed launcher
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)

    flags = {"model": args.model, "output_dir": args.output_dir, "max_steps": args.max_steps, "rollout": args.rollout,
             "memory_check": False if args.force else None}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
    with one_line_errors(args.debug):  # every config error surfaces here, before any model loads
        cfg = Config.load(args.config, overrides)
        unknown = sorted(set(cfg.rewards) - set(COUNTDOWN_REWARDS))
        if unknown:
            raise ConfigError(f"rewards: unknown {unknown}; this script knows {sorted(COUNTDOWN_REWARDS)}")
    return args, cfg


def print_plan(args: argparse.Namespace, cfg: Config) -> int:
    """--plan: the memory and disk plan (minigrpo/plan.py) from the config and the model's config.json."""
    from minigrpo.plan import GiB, format_plan, gpu_bytes, model_config, parse_bytes, plan_memory

    gpu = parse_bytes(args.gpu_memory) if args.gpu_memory else (gpu_bytes() or 80 * GiB)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    plan = plan_memory(cfg, world, gpu, model_config(cfg))
    print(format_plan(plan, cfg, world))
    return 0 if plan.fits else 2


def main(argv: list[str] | None = None) -> None:
    args, cfg = load_config(argv)
    if args.plan:
        raise SystemExit(print_plan(args, cfg))
    if launched_as_rank0():  # the first line on the screen, seconds after the command
        print(f"[minigrpo] Countdown GRPO: {Path(args.config).name}, model {cfg.model}, {cfg.max_steps} steps, "
              f"outputs in {cfg.output_dir}", flush=True)
    with one_line_errors(args.debug):  # a wrong model path (train would find it after minutes of start-up)
        resolve_model(cfg.model)  # the built-in model is converted here once, then cached
    splits = load_recipe_tasks(cfg)  # without the tasks of its held-out set, if it names one
    out = train(cfg, [COUNTDOWN_REWARDS[name] for name in cfg.rewards], splits["train"], splits["test"], template=R1_COUNTDOWN,
                resume=args.resume)
    print(f"[minigrpo] done. outputs in {out}: metrics.jsonl, curves.png, completion_samples.txt, "
          f"checkpoints/ (latest: {sorted((out / 'checkpoints').glob('step-*'))[-1].name})")
    if Path(args.config).resolve() == DEFAULT_RECIPE:  # this run teaches the format; where success is taught
        print("[minigrpo] to see GRPO raise held-out success, not only the format: the warm-up, then 20 GRPO steps "
              "(docs/results.md, 'Issue 22'): python examples/countdown_warmup.py --config "
              "recipes/countdown_cpu_solve_warmup.yaml && python examples/countdown.py --config "
              "recipes/countdown_cpu_solve.yaml --model outputs/countdown-solve-warmup/model")


if __name__ == "__main__":  # vLLM starts worker processes by spawn: the guard is required
    main()
